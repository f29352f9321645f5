"""``evaluate``: the Python API under ``depth-engine evaluate`` — a teacher's zero-shot AbsRel
and δ1 on a labeled set, on the engine's actors.

SOURCE is an OUTPUT (its committed shards are read; the label stored there is scored too) or
an INPUT in any form ``label`` takes. Nothing is written anywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from engine import job
from engine.config import ActorJob, ConfigError, check_resources, check_teacher_output
from engine.inputs import InputError, expand
from engine.label import resolve_teacher
from engine.models import ModelSourceError, weight_bytes
from engine.runtime.run import run_shards
from engine.runtime.session import ray_session
from labelers.ground_truth import GroundTruthRule
from labelers.plugins import PluginError
from pipelines.evaluate import ShardEvaluation, summarize
from pipelines.tasks import ShardTask
from storage import layout
from storage.objectstore import StorageError
from storage.output import Output
from storage.stores import open_store

# The paper's zero-shot figures (Depth Anything ViT-L, Table 2) to read a result against.
PAPER = {"KITTI": {"abs_rel": 0.076, "delta1": 0.947}, "NYUv2": {"abs_rel": 0.043, "delta1": 0.981}}


@dataclass(frozen=True)
class EvalConfig(ActorJob):
    source: str
    teacher: str
    teacher_output: str | None = None      # "disparity" | "depth"; None: from the teacher's config
    ground_truth: GroundTruthRule = GroundTruthRule()

    def __post_init__(self):
        check_teacher_output(self)
        check_resources(self)


@dataclass(frozen=True)
class Source:
    shards: list[str]      # shard URLs to read
    kind: str              # "input", or the OUTPUT's source_kind: "gt" / "pseudo"
    label: str | None      # what the OUTPUT's disp.png holds, for the report


def source_shards(spec: str) -> Source:
    """An OUTPUT (job.json present: its committed shards) or an INPUT pattern."""
    if not any(c in spec for c in "{*?[@"):
        try:
            store = open_store(spec if spec.endswith("/") else spec + "/")
            doc = job.read(store)
        except (ValueError, StorageError):
            doc = None
        if doc is not None:
            if doc.get("label", {}).get("keep_depth"):
                raise ConfigError(f"{store.url} holds the teacher's own metric depth as depth.png (--keep-depth), "
                                  "not ground truth: evaluate the labeled INPUT or a convert-gt OUTPUT instead")
            output = Output(store)
            names = sorted(output.committed())
            if not names:
                raise ConfigError(f"{store.url} is an OUTPUT with no committed shard yet")
            base = store.url.rstrip("/")
            kind = job.source_kind(doc)
            teacher = (doc["label"].get("teacher") or {}).get("source")
            tars = output.tar_keys(names)
            return Source([f"{base}/{tars[n]}" for n in names], kind,
                          "converted ground truth" if kind == "gt" else f"pseudo-label of {teacher}")
    try:
        return Source(expand(spec), "input", None)
    except InputError as e:
        raise ConfigError(str(e)) from None


def evaluate(config: EvalConfig) -> dict:
    """The report ``depth-engine evaluate --json`` prints: aggregates, then one row per sample."""
    from engine.runtime.actors import EvalActor, WorkerSpec

    t0 = time.time()
    source = source_shards(config.source)
    try:
        teacher, kind = resolve_teacher(config.teacher, config.teacher_output)
    except (ModelSourceError, PluginError) as e:
        raise ConfigError(str(e)) from None
    results: list[ShardEvaluation] = []
    failed: dict[str, str] = {}

    def on_failure(task: ShardTask, errors: list[dict]) -> None:
        failed[task.name] = errors[-1]["error"]

    spec = WorkerSpec(output="", teacher=config.teacher, teacher_sha256=teacher.sha256, sky=None,
                      sky_sha256=None, ground_truth=config.ground_truth, teacher_output=kind,
                      dtype=config.dtype, batch_size=config.batch_size)
    with ray_session(config, weight_bytes(teacher)) as lay:
        device = lay.device
        run_shards([ShardTask(u, layout.shard_name(u)) for u in source.shards], EvalActor, spec, lay,
                   max_attempts=config.max_attempts, on_result=results.append, on_failure=on_failure,
                   progress=config.progress, command="evaluate", output=config.source)
    rows = [row for r in sorted(results, key=lambda r: r.name) for row in r.rows]
    return {
        "source": config.source, "source_kind": source.kind, "stored_label": source.label,
        "teacher": teacher.provenance(), "teacher_output": kind,
        "ground_truth": {"scale": config.ground_truth.scale, "max_depth": config.ground_truth.max_depth},
        "protocol": "least-squares scale and shift in disparity space over valid pixels "
                    "(a depth teacher's output taken as 1/depth); "
                    "AbsRel and delta1 (<1.25) in depth space; means over samples",
        "summary": summarize(rows), "paper": PAPER,
        "shards": {"total": len(source.shards), "evaluated": len(results), "failed": len(failed)},
        "failed_shards": failed, "device": device, "wall_seconds": time.time() - t0,
        "samples": rows,
    }


def print_report(r: dict, worst: int = 10) -> None:
    s = r["summary"]
    print(f"{s['samples']} samples: {s['scored']} scored, {s['skipped']} without ground truth, "
          f"{s['errors']} errors; shards: {r['shards']['evaluated']} evaluated, {r['shards']['failed']} failed")
    lines = [("teacher", r["teacher"]["source"], s["teacher"])]
    if s["label"]["samples"]:
        lines.append(("stored label", r["stored_label"] or "disp.png", s["label"]))
    print(f"{'':14}{'AbsRel':>9}{'δ1':>9}{'samples':>9}  model")
    for what, name, m in lines:
        print(f"{what:14}{_num(m['abs_rel']):>9}{_num(m['delta1']):>9}{m['samples']:>9}  {name}")
    for name, m in r["paper"].items():
        print(f"{'paper ' + name:14}{_num(m['abs_rel']):>9}{_num(m['delta1']):>9}{'':>9}  Depth Anything ViT-L")
    scored = [x for x in r["samples"] if x["status"] == "ok"]
    if len(scored) > 1:
        print(f"worst samples by teacher AbsRel (all {len(scored)} in --json):")
        for x in sorted(scored, key=lambda x: -x["teacher"]["abs_rel"])[:worst]:
            print(f"  {x['shard']}/{x['key']}: AbsRel {_num(x['teacher']['abs_rel'])}, "
                  f"δ1 {_num(x['teacher']['delta1'])}, {x['pixels']} pixels")
    for name, why in r["failed_shards"].items():
        print(f"  failed shard {name}: {why}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
