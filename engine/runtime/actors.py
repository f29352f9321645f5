"""The engine's actors (labeling, evaluation): models loaded once, then one shard per call.

Ray owns placement (one actor per GPU, or N CPU actors); an actor only binds a pipeline to
its models and reports live progress from a second concurrency group, so the driver can ask
while a shard is in flight.
"""
from __future__ import annotations

import os
import re
import resource
import socket
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import ray

from engine.models import resolve
from engine.runtime import preemption
from engine.runtime.allocator import keep_freed_buffers
from engine.runtime.attempt import Attempt
from labelers import plugins
from labelers.devices import GpuSampler
from labelers.ground_truth import GroundTruthRule
from labelers.plugins import is_plugin
from pipelines.compare import ShardComparison, compare_shard
from pipelines.decode import SampleLimits
from pipelines.evaluate import ShardEvaluation, evaluate_shard
from pipelines.pseudo_label import Labelers, ShardResult, label_shard
from pipelines.repair import repair_shard
from pipelines.tasks import Progress, ShardTask
from storage.commit import ClaimPolicy
from storage.s3_client import request_counts, retry_counts
from storage.stores import open_store


@dataclass(frozen=True)
class WorkerSpec:
    output: str
    teacher: str | None              # None: ground-truth conversion
    teacher_sha256: str | None
    sky: str | None
    sky_sha256: str | None
    ground_truth: GroundTruthRule | None = None
    teacher_config_sha256: str | None = None   # what job.json pins of the models' configs (None: unchecked)
    sky_config_sha256: str | None = None
    teacher_output: str = "disparity"   # what the teacher outputs, decided on the driver (job.json)
    keep_depth: bool = False            # a depth teacher's metres kept as depth.png (job.json)
    label_size: str | int = "image"     # the labels' size rule (job.json)
    draft_decode: bool = False          # JPEGs decoded at the models' DCT scale (job.json)
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8
    threads: int = 4
    torch_threads: int | None = None
    claim_seconds: float = 60.0
    limits: SampleLimits = SampleLimits()
    repair: str | None = None           # label --repair-errors: the reason regex ("" any); None labels


@dataclass(frozen=True)
class CompareSpec:
    """What a compare worker needs: the two OUTPUTs (B None: the ``teacher`` labels A's images)."""

    a: str
    b: str | None
    fraction: float = 1.0
    teacher: WorkerSpec | None = None
    device: str = "cpu"
    batch_size: int = 8
    threads: int = 4
    torch_threads: int | None = None


def _check_same_model(source: str, ref, expected: str, expected_config: str | None) -> None:
    if ref.sha256 != expected:
        raise RuntimeError(f"model {source} on {socket.gethostname()} has weights sha256 {ref.sha256[:12]}, "
                           f"job.json pins {expected[:12]}: the node sees another version")
    if expected_config and ref.config_sha256 != expected_config:
        raise RuntimeError(f"model {source} on {socket.gethostname()} has config sha256 {ref.config_sha256[:12]}, "
                           f"job.json pins {expected_config[:12]}: the node sees another config")


def load_labelers(spec: WorkerSpec) -> Labelers:
    """Resolve (once per node) and load the models this worker labels with."""
    import torch
    import transformers

    from labelers.devices import resolve_device
    from labelers.sky import SkySegmenter
    from labelers.teacher import Teacher

    transformers.logging.set_verbosity_error()        # no per-actor weight-loading bars
    transformers.logging.disable_progress_bar()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    device = resolve_device(spec.device)
    teacher = None
    if is_plugin(spec.teacher):
        teacher = plugins.load(spec.teacher, device=str(device), dtype=spec.dtype, sha256=spec.teacher_sha256)
        if teacher.output != spec.teacher_output:
            raise RuntimeError(f"teacher {spec.teacher} on {socket.gethostname()} outputs {teacher.output}, "
                               f"job.json pins {spec.teacher_output}: the node has another version")
    elif spec.teacher:
        ref = resolve(spec.teacher)
        _check_same_model(spec.teacher, ref, spec.teacher_sha256, spec.teacher_config_sha256)
        teacher = Teacher.load(ref.path, device=str(device), dtype=spec.dtype, name=spec.teacher,
                               output=spec.teacher_output)
    sky = None
    if spec.sky:
        sref = resolve(spec.sky)
        _check_same_model(spec.sky, sref, spec.sky_sha256, spec.sky_config_sha256)
        sky = SkySegmenter.load(sref.path, device=str(device), dtype=spec.dtype, name=spec.sky)
    return Labelers(teacher, sky, spec.ground_truth, keep_depth=spec.keep_depth, label_size=spec.label_size,
                    draft_decode=spec.draft_decode)


class _Worker:
    """What the scheduler asks of every actor: its name once the models are loaded, live
    progress from a second concurrency group, and each shard's result in the runtime's
    envelope (who ran it; its time, memory, GPU and S3 requests). A flow defines ``work``."""

    def _started(self, device) -> None:
        gpus = ray.get_gpu_ids()
        self.name = f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpus[0]}" if gpus else "")
        self.device = device
        self.live = Progress()
        preemption.install()        # SIGTERM: give the shard up at once (runs on the main thread)
        keep_freed_buffers()        # each image's large buffers reused, not faulted in again

    def ready(self) -> str:
        return self.name

    @ray.method(concurrency_group="report")
    def progress(self) -> dict:
        return asdict(self.live)

    def work(self, task: ShardTask, live: Progress):
        raise NotImplementedError

    def run(self, task: ShardTask) -> Attempt:
        self.live = Progress(extra={"shard": task.name})
        before, retried = request_counts(), retry_counts()
        t0 = time.perf_counter()
        with GpuSampler(self.device) as gpu:
            result = self.work(task, self.live)
        return Attempt(result=result, worker=self.name, attempt=task.attempt, seconds=time.perf_counter() - t0,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
                       gpu_utilization=gpu.mean, s3_requests=_since(before, request_counts()),
                       s3_retries=_since(retried, retry_counts()))


def _since(before: dict, after: dict) -> dict:
    """Counters by operation: what grew between two readings."""
    return {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}


@ray.remote(concurrency_groups={"report": 1})
class LabelActor(_Worker):
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.labelers = load_labelers(spec)
        self.output = open_store(spec.output)
        self._started(self.labelers.device or "cpu")

    def work(self, task: ShardTask, live: Progress) -> ShardResult:
        flow = label_shard
        if self.spec.repair is not None:        # only the error rows, into the next generation
            flow = partial(repair_shard, reason=re.compile(self.spec.repair) if self.spec.repair else None)
        return flow(task, self.labelers, self.output, batch_size=self.spec.batch_size,
                    threads=self.spec.threads, worker=self.name, progress=live,
                    claim=ClaimPolicy.of(self.spec.claim_seconds), limits=self.spec.limits)


@ray.remote(concurrency_groups={"report": 1})
class EvalActor(_Worker):
    """A teacher scoring labeled shards (``spec.ground_truth`` says how to read them): the same
    placement and scheduling as LabelActor, and nothing written."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.teacher = load_labelers(replace(spec, sky=None, ground_truth=None)).teacher
        self._started(self.teacher.device)

    def work(self, task: ShardTask, live: Progress) -> ShardEvaluation:
        return evaluate_shard(task, self.teacher, self.spec.ground_truth, batch_size=self.spec.batch_size,
                              threads=self.spec.threads, worker=self.name, progress=live)


@ray.remote(concurrency_groups={"report": 1})
class CompareActor(_Worker):
    """Two label sets of one shard side by side (pipelines.compare); B a stored OUTPUT, or a
    teacher loaded here that labels A's sampled images."""

    def __init__(self, spec: CompareSpec):
        self.spec = spec
        self.a = open_store(spec.a)
        self.b = open_store(spec.b) if spec.b else None
        self.labelers = None
        if spec.teacher:
            self.labelers = load_labelers(replace(spec.teacher, device=spec.device, torch_threads=spec.torch_threads))
        self._started((self.labelers.device if self.labelers else None) or "cpu")

    def work(self, task: ShardTask, live: Progress) -> ShardComparison:
        return compare_shard(task, self.a, self.b, fraction=self.spec.fraction, labelers=self.labelers,
                             batch_size=self.spec.batch_size, threads=self.spec.threads, worker=self.name,
                             progress=live)


@ray.remote(concurrency_groups={"report": 1})
class CalibrateActor(_Worker):
    """A label actor that writes nothing to OUTPUT: the job's models, loaded as a LabelActor
    loads them, label a few real input images (pipelines.calibrate) and it says how fast
    (``label --dry-run``)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.labelers = load_labelers(spec)
        self._started(self.labelers.device or "cpu")

    def calibrate(self, sources: list[str], images: int) -> dict:
        from pipelines.calibrate import calibrate, first_samples

        samples, used = first_samples(sources, images, self.spec.limits)
        if not samples:
            raise ValueError(f"no image found in the first pending shard(s): {', '.join(sources)}")
        c = calibrate(samples, self.labelers, batch_size=self.spec.batch_size, threads=self.spec.threads,
                      limits=self.spec.limits, sources=tuple(used))
        return {"worker": self.name, "device": str(self.device), **self.labelers.names,
                "teacher_sha256": self.spec.teacher_sha256, "sky_sha256": self.spec.sky_sha256,
                "images": c.images, "seconds": round(c.seconds, 4), "warmup_seconds": round(c.warmup_seconds, 4),
                "images_per_second": round(c.images_per_second, 4), "bytes_per_image": round(c.bytes_per_image, 1),
                "stage_seconds": c.stage_seconds, "sources": list(c.sources)}
