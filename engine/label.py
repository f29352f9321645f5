"""``label``: the Python API under ``depth-engine label`` (a notebook can call it too).

Order of work: validate models and config on the driver (exit 2 before any cluster
time is spent), write job.json, plan from listings, run the shards on actors, write
failure markers, summarise.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from engine import job, runs
from engine import plan as planning
from engine.config import ConfigError, LabelConfig
from engine.inputs import expand
from engine.lock import JobLock
from engine.models import (
    DEPTH,
    OUTPUT_DISPARITY,
    SEGMENTATION,
    ModelRef,
    check_task,
    id2label,
    model_config,
    resolve,
    teacher_output_of,
    weight_bytes,
)
from engine.runtime.actors import LabelActor, WorkerSpec
from engine.runtime.run import run_shards
from engine.runtime.session import ray_session
from labelers.normalize import METRIC_OUTPUTS
from labelers.plugins import PluginError, PluginRef, is_plugin
from labelers.plugins import find as find_plugin
from pipelines.pseudo_label import ShardResult
from pipelines.tasks import ShardTask
from storage import layout
from storage.objectstore import ObjectStore, StorageError, is_s3
from storage.stores import open_store


@dataclass
class Summary:
    output: str
    shards_total: int = 0
    shards_committed: int = 0          # committed by this run
    shards_skipped: int = 0            # already committed before this run
    shards_failed: int = 0             # failed permanently (now or before, unless retried)
    samples_ok: int = 0
    samples_error: int = 0
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0       # cluster start and model load, until the first worker was ready
    images_per_second: float = 0.0     # steady state: from the first ready worker to the last shard
    model_busy_fraction: float = 0.0  # time inside the models / actor time, over this run's shards
    stage_seconds: dict = field(default_factory=dict)   # per stage, summed over this run's shards
    gpu_utilization: float | None = None                # mean sampled GPU utilization (%), if any
    s3_requests: dict = field(default_factory=dict)     # the workers' S3 requests, by operation
    s3_retries: dict = field(default_factory=dict)      # of them, retries (throttling, 5xx, cut connections)
    workers: int = 0
    device: str = ""
    layout: str = ""                   # the actors and threads chosen, and why
    peak_worker_rss_mb: float = 0.0    # the largest peak RSS of any worker process
    failed_shards: list[str] = field(default_factory=list)
    estimate: dict | None = None       # the ETA made at 10 % of the shards, beside what happened

    @property
    def exit_code(self) -> int:
        return 3 if self.shards_failed else 0

    def to_json(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


def resolve_teacher(source: str, override: str | None = None) -> tuple[ModelRef | PluginRef, str]:
    """The teacher a job names (a transformers model, or ``plugin:NAME[:ARG]``) and what it
    outputs, decided on the driver from its config or the plugin's class (job.json pins both)."""
    if is_plugin(source):
        ref = find_plugin(source)
        if override is not None and override != ref.output:
            raise PluginError(f"teacher {source} outputs {ref.output}; --teacher-output {override} contradicts it")
        return ref, ref.output
    ref = resolve(source)
    check_task(ref, DEPTH)
    return ref, teacher_output_of(ref, override)


def teacher_input(ref: ModelRef | PluginRef) -> dict | None:
    """The teacher's input geometry from its own processor config (pinned in job.json); a
    plugin's is its own (None)."""
    if isinstance(ref, PluginRef):
        return None
    import transformers

    transformers.logging.set_verbosity_error()

    from labelers.loading import load_image_processor
    from labelers.teacher import TeacherPreprocess

    family = model_config(ref).get("model_type")
    pre = TeacherPreprocess.from_processor(load_image_processor(ref.path, family=family), family=family)
    geometry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(pre).items()}
    if pre.family == "depth_anything":     # as pinned before families existed: old OUTPUTs resume
        geometry = {k: v for k, v in geometry.items() if k not in ("family", "rule", "pad", "resize_mode")}
    return geometry


def check_sky_model(ref: ModelRef) -> None:
    """Refuse a sky model that is no semantic segmentation model, or has no sky class, before
    any cluster time is spent (from its config alone: the weights are not loaded on the driver)."""
    from labelers.sky import sky_class_ids

    check_task(ref, SEGMENTATION)
    labels = id2label(ref)
    which = None
    if (bad := next((k for k in sorted(labels, key=str) if not str(k).isdigit()), None)) is not None:
        which = f"key {bad!r} is not a class index"
    elif (ids := sorted(int(k) for k in labels)) != list(range(len(ids))):
        which = f"keys {ids[:3]} ... {ids[-1]} are not the class indices 0..{len(ids) - 1}"
    if which:
        raise ConfigError(f"sky model {ref.source}: its id2label {which}; the model's logits are indexed 0..N-1")
    if not sky_class_ids(labels):
        raise ConfigError(f"sky model {ref.source} has no class named 'sky' in its id2label; "
                          "pass a segmentation model with a sky class, or --sky none")


@dataclass(frozen=True)
class Prepared:
    """A job checked on the driver, nothing written yet: INPUT listed, models resolved and
    checked, job.json's content built. What ``label`` and its dry run (engine.dry_run) share."""

    output: ObjectStore
    shards: list[str]
    teacher: ModelRef | PluginRef | None
    sky: ModelRef | None
    kind: str | None                   # what the teacher outputs (None: ground truth)
    spec: job.JobSpec


def prepare(config: LabelConfig) -> Prepared:
    """Everything ``label`` checks before it touches OUTPUT (exit 2 on any of it)."""
    output = open_store(config.output)
    try:
        shards = expand(config.input, exclude=output.url)
        teacher, kind = resolve_teacher(config.teacher, config.teacher_output) if config.teacher else (None, None)
        if teacher and config.keep_depth and kind not in METRIC_OUTPUTS:
            raise ConfigError(f"--keep-depth needs a teacher that outputs metric depth; {config.teacher} outputs {kind}")
        if config.draft_decode and isinstance(teacher, PluginRef):
            raise ConfigError("--draft-decode needs a transformers teacher: a plugin's target_size is a bucket, "
                              "not the input size its model needs")
        sky = resolve(config.sky) if config.sky else None
        if sky:
            check_sky_model(sky)
        spec = job.JobSpec.build(config, shards, teacher, sky, teacher_input(teacher) if teacher else None, kind)
    except ValueError as e:   # InputError, ModelSourceError, PluginError, a processor config refused
        raise ConfigError(str(e)) from None
    return Prepared(output, shards, teacher, sky, kind, spec)


def label(config: LabelConfig) -> Summary:
    t0 = time.time()
    p = prepare(config)
    output, shards, teacher, sky, kind, spec = p.output, p.shards, p.teacher, p.sky, p.kind, p.spec
    with JobLock(output, config.lease_seconds) as lock:
        job.write(output, spec)
        # Writes that no live job owns: a killed attempt's upload, a crashed writer's temp file.
        output.abort_incomplete("", before=lock.acquired_at)
        return _label_locked(config, output, shards, teacher, sky, lock, t0, kind)


def _label_locked(config, output, shards, teacher, sky, lock, t0, kind=None) -> Summary:
    todo = planning.plan(output, shards, retry_failed=config.retry_failed)
    summary = Summary(output=output.url, shards_total=todo.total, shards_skipped=len(todo.committed),
                      shards_failed=0 if config.retry_failed else len(todo.failed),
                      failed_shards=[] if config.retry_failed else list(todo.failed))
    if not todo.todo:
        summary.wall_seconds = time.time() - t0
        return summary

    spec = worker_spec(config, output.url, teacher, sky, kind)
    with ray_session(config, weight_bytes(teacher, sky)) as lay:
        summary.workers, summary.device, summary.layout = lay.actors, lay.device, lay.describe()
        _run(config, output, todo.todo, spec, lay, summary, lock)
    summary.wall_seconds = time.time() - t0
    return summary


def worker_spec(config: LabelConfig, output_url: str, teacher, sky, kind: str | None) -> WorkerSpec:
    """What each label actor loads and how it labels (its dry run's calibration actor too)."""
    return WorkerSpec(output=output_url, teacher=config.teacher, teacher_sha256=teacher.sha256 if teacher else None,
                      teacher_output=kind or OUTPUT_DISPARITY, keep_depth=config.keep_depth,
                      label_size=config.label_size, draft_decode=config.draft_decode,
                      ground_truth=config.ground_truth, sky=config.sky, sky_sha256=sky.sha256 if sky else None,
                      teacher_config_sha256=getattr(teacher, "config_sha256", None),
                      sky_config_sha256=sky.config_sha256 if sky else None,
                      dtype=config.dtype, batch_size=config.batch_size, claim_seconds=config.claim_seconds,
                      limits=config.limits)


def _run(config, output, urls, spec, lay, summary, lock) -> None:
    busy = {"model": 0.0, "actor": 0.0, "tar_bytes": 0}

    def on_result(r: ShardResult) -> None:
        if not r.committed:             # another attempt had committed it meanwhile
            summary.shards_skipped += 1
            return
        summary.shards_committed += 1
        summary.samples_ok += r.ok
        summary.samples_error += r.errors
        busy["model"] += r.model_seconds
        busy["actor"] += r.seconds
        busy["tar_bytes"] += r.tar_size
        for stage, seconds in r.stage_seconds.items():
            summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
        if config.retry_failed:
            output.delete(layout.failed_key(r.name))

    def on_failure(task: ShardTask, errors: list[dict]) -> None:
        marker = {"shard": task.name, "source": task.source, "attempts": len(errors),
                  "error": errors[-1]["error"], "errors": errors,
                  "first_started": errors[0]["started"], "failed_at": time.time()}
        output.put(layout.failed_key(task.name), json.dumps(marker, indent=2).encode())
        summary.shards_failed += 1
        summary.failed_shards.append(task.name)

    run = run_shards([ShardTask(u, layout.shard_name(u)) for u in urls], LabelActor, spec, lay,
                     max_attempts=config.max_attempts, on_result=on_result, on_failure=on_failure,
                     progress=config.progress, sizes=input_sizes(urls),
                     command="convert-gt" if config.ground_truth else "label", output=output.url,
                     should_stop=lambda: lock.lost and f"the job lease on {output.url} was lost: {lock.lost}")
    summary.estimate = run.estimate
    summary.startup_seconds = run.startup_seconds
    done = summary.samples_ok + summary.samples_error
    summary.images_per_second = done / run.steady_seconds if run.steady_seconds > 0 else 0.0
    summary.model_busy_fraction = busy["model"] / busy["actor"] if busy["actor"] else 0.0
    summary.stage_seconds = {k: round(v, 3) for k, v in summary.stage_seconds.items()}
    summary.gpu_utilization = run.telemetry.gpu_utilization
    summary.s3_requests = run.telemetry.s3_requests
    summary.s3_retries = run.telemetry.s3_retries
    summary.peak_worker_rss_mb = run.telemetry.peak_rss_bytes / 2**20
    if done and run.steady_seconds > 0:   # the rate a later dry run plans with (engine.runs)
        _record_run(output, runs.RunRecord.of(
            summary, shards=summary.shards_committed, workers=min(lay.actors, len(urls)),
            seconds=run.steady_seconds, output_bytes=busy["tar_bytes"], teacher=config.teacher, sky=config.sky,
            batch_size=config.batch_size))


def _record_run(output, record) -> None:
    """Best effort: every shard is committed by now, and a lost record only costs an estimate."""
    try:
        runs.write(output, record)
    except StorageError as e:
        logging.getLogger(__name__).warning("could not record the run's rate in %s: %s", output.url, e)


def input_sizes(urls: list[str]) -> dict[str, int | None]:
    """Input bytes per shard name where a stat tells them (local files); None on S3, where the
    ETA counts shards instead (a HEAD per shard would cost more than it tells)."""
    sizes: dict[str, int | None] = {}
    for u in urls:
        try:
            sizes[layout.shard_name(u)] = None if is_s3(u) else os.path.getsize(u)
        except OSError:
            sizes[layout.shard_name(u)] = None
    return sizes
