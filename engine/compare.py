"""``compare``: the Python API under ``depth-engine compare A B`` — two label sets side by
side, per sample, on the engine's actors.

A is an OUTPUT; B is an OUTPUT (pseudo-labels or convert-gt) or a teacher, which then labels
A's sampled images on the fly with the label flow. Shards pair by name (an OUTPUT shard is
named after its input shard), samples by key within a pair. Nothing is written but ``--out``
(one Parquet row per compared sample, written to a temporary name and moved into place at
the end, so an interrupted comparison leaves nothing) and ``--html``.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from engine.config import ActorJob, ConfigError, check_resources
from engine.models import ModelSourceError, resolve, weight_bytes
from labelers.plugins import PluginError
from pipelines.compare import CompareSummary, ShardComparison
from pipelines.tasks import ShardTask
from storage.objectstore import StorageError
from storage.output import Output
from storage.stores import locate, open_store


@dataclass(frozen=True)
class CompareConfig(ActorJob):
    a: str
    b: str
    sample: float = 1.0                  # the fraction of samples compared, chosen by a hash of the key
    out: str | None = None               # Parquet: one row per compared sample
    worst: int = 24                      # the worst pairs kept for the report and the HTML page
    sky: str | None = None               # B as a teacher: its sky model (None: A's, from its job.json)

    def __post_init__(self):
        if not 0.0 < self.sample <= 1.0:
            raise ConfigError(f"--sample must be a fraction in (0, 1], got {self.sample}")
        if self.worst < 0:
            raise ConfigError(f"--worst must be >= 0, got {self.worst}")
        check_resources(self)


@dataclass(frozen=True)
class Sides:
    a: Output
    b: Output | None             # None: B is a teacher
    teacher: object = None       # the teacher's WorkerSpec (models resolved on the driver)
    model_bytes: int = 0


def _output(url: str) -> Output | None:
    try:
        view = Output(open_store(url if url.endswith("/") else url + "/"))
        return view if view.is_output() else None
    except (ValueError, StorageError):
        return None


def sides(config: CompareConfig) -> Sides:
    """A must be an OUTPUT; B an OUTPUT, else a teacher (resolved here, before any cluster time)."""
    from engine.label import check_sky_model, resolve_teacher
    from engine.runtime.actors import WorkerSpec

    a = _output(config.a)
    if a is None:
        raise ConfigError(f"{config.a} is not a depth-engine OUTPUT (no job.json, no manifest part)")
    b = _output(config.b)
    if b is not None:
        return Sides(a, b)
    try:
        teacher, kind = resolve_teacher(config.b)
    except (ModelSourceError, PluginError, ValueError) as e:
        raise ConfigError(f"{config.b} is neither a depth-engine OUTPUT nor a teacher: {e}") from None
    job = a.job() or {}
    sky_source = config.sky or ((job.get("label") or {}).get("sky") or {}).get("source")
    sky = None
    if sky_source and sky_source.lower() != "none":
        try:
            sky = resolve(sky_source)
        except ModelSourceError as e:
            raise ConfigError(str(e)) from None
        check_sky_model(sky)
    spec = WorkerSpec(output="", teacher=config.b, teacher_sha256=teacher.sha256, teacher_output=kind,
                      sky=sky.source if sky else None, sky_sha256=sky.sha256 if sky else None,
                      dtype=config.dtype, batch_size=config.batch_size)
    return Sides(a, None, spec, weight_bytes(teacher, sky))


def compare(config: CompareConfig) -> dict:
    """The report ``depth-engine compare --json`` prints (the rows go to ``config.out``)."""
    from engine.runtime.actors import CompareActor, CompareSpec
    from engine.runtime.run import run_shards
    from engine.runtime.session import ray_session

    t0 = time.time()
    s = sides(config)
    names = sorted(s.a.committed() | (s.b.committed() if s.b else frozenset()))
    if not names:
        raise ConfigError(f"{config.a} has no committed shard yet")
    summary = CompareSummary(worst=config.worst)
    failed: dict[str, str] = {}
    sink = _RowSink(config.out) if config.out else None

    def on_result(r: ShardComparison) -> None:
        summary.add(r)
        if sink:
            sink.write(r.rows)

    def on_failure(task: ShardTask, errors: list[dict]) -> None:
        failed[task.name] = errors[-1]["error"]

    spec = CompareSpec(a=s.a.url, b=s.b.url if s.b else None, fraction=config.sample, teacher=s.teacher,
                       batch_size=config.batch_size)
    # Two stored label sets need no model: CPU actors, wherever the GPUs are.
    layout_config = config if s.teacher else _on_cpu(config)
    try:
        with ray_session(layout_config, s.model_bytes) as lay:
            tars = s.a.tar_keys(names)
            run = run_shards([ShardTask(s.a.store.url_of(tars[n]), n) for n in names], CompareActor, spec,
                             lay, max_attempts=config.max_attempts, on_result=on_result, on_failure=on_failure,
                             progress=config.progress, command="compare", output=s.a.url)
        if sink:
            sink.close()
    except BaseException:
        if sink:
            sink.abort()
        raise
    report = summary.to_json()
    compared = report["counts"]["compared"]
    return {
        "a": s.a.url, "b": s.b.url if s.b else config.b, "b_kind": "output" if s.b else "teacher",
        "sample": config.sample, **report,
        "shards": {"total": len(names), "compared": len(names) - len(failed), "failed": len(failed)},
        "failed_shards": failed, "out": config.out, "layout": lay.describe(), "workers": lay.actors,
        "wall_seconds": time.time() - t0, "startup_seconds": run.startup_seconds, "steady_seconds": run.steady_seconds,
        "samples_per_second": compared / run.steady_seconds if run.steady_seconds > 0 else 0.0,
        "s3_requests": run.telemetry.s3_requests,
        "peak_worker_rss_mb": round(run.telemetry.peak_rss_bytes / 2**20, 1),
    }


def _on_cpu(config: CompareConfig) -> CompareConfig:
    from dataclasses import replace

    return replace(config, device="cpu", dtype="auto")


class _RowSink:
    """``--out``: the rows of each finished shard appended to one Parquet file, written to a
    temporary file and moved (local) or uploaded (s3://) into place only when all is done."""

    def __init__(self, url: str):
        import pyarrow.parquet as pq

        from pipelines.compare import ROW_SCHEMA

        self.url = url
        self.store, self.key = locate(url)
        fd, self.tmp = tempfile.mkstemp(prefix=".compare-", suffix=".parquet",
                                        dir=None if url.startswith("s3://") else os.path.dirname(os.path.abspath(url)))
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, ROW_SCHEMA)

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        from pipelines.compare import ROW_SCHEMA

        if rows:
            self.writer.write_table(pa.Table.from_pylist(
                [{k: v for k, v in r.items() if k in ROW_SCHEMA.names} for r in rows], schema=ROW_SCHEMA))

    def close(self) -> None:
        self.writer.close()
        if self.url.startswith("s3://"):
            with open(self.tmp, "rb") as f, self.store.open_write(self.key) as out:
                while chunk := f.read(16 << 20):
                    out.write(chunk)
            os.unlink(self.tmp)
        else:
            os.replace(self.tmp, os.path.abspath(self.url))

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def print_report(r: dict, worst: int = 10) -> None:
    c = r["counts"]
    print(f"A {r['a']}\nB {r['b']}" + (" (a teacher, labeling A's images now)" if r["b_kind"] == "teacher" else ""))
    print(f"{c['compared']} pairs compared of {c['matched']} matched (sample {r['sample']:g}); unmatched: "
          f"{c['only_a']} only in A, {c['only_b']} only in B; error rows: {c['error_a']} in A, {c['error_b']} in B")
    print(f"{'':20}{'mean':>9}{'p05':>9}{'p50':>9}{'p95':>9}")
    for name, f in r["figures"].items():
        print(f"{name:20}" + "".join(f"{_num(f.get(k)):>9}" for k in ("mean", "p05", "p50", "p95")))
    t = r["thresholds"]
    print(f"disagree: {c['disagree']} pairs (AbsRel > {t['abs_rel']}, δ1 < {t['delta1']}, sky IoU < {t['sky_iou']} "
          f"where a sky covers {t['sky_iou_min_sky']:.0%} or more, or inverted); inverted: {c['inverted']}")
    for x in r["worst"][:worst]:
        print(f"  {x['shard']}/{x['key']}: AbsRel {_num(x.get('abs_rel'))}, δ1 {_num(x.get('delta1'))}, "
              f"scale {_num(x.get('scale'))}" + (" INVERTED" if x.get("inverted") else ""))
    for name, why in r["failed_shards"].items():
        print(f"  failed shard {name}: {why}")
    if r.get("out"):
        print(f"rows: {r['out']}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
