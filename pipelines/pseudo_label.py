"""The pseudo-label flow (Depth Anything's data engine), written down once, in order:

    read shard -> decode -> [bucket by teacher size] -> sky -> teacher -> normalize+encode -> write shard -> commit

A ground-truth conversion is the same flow with the teacher replaced by the sample's own
ground truth (read in the decode stage), so labeled and pseudo-labeled sets share one format,
one engine and one commit protocol (SPEC §5.5).

``label_batch`` is the model step over one batch; ``label_shard`` runs the whole flow for
one shard with decode and encode in threads around the model. Nothing here knows about
Ray: the engine calls ``label_shard`` inside an actor, tests call it in-process.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Collection

from labelers.devices import upload
from labelers.ground_truth import GroundTruthRule
from labelers.normalize import METRIC_OUTPUTS
from labelers.prediction import NoLabel
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.concurrency import Bucketer, OrderedSink, PixelBudget, prefetch_map
from pipelines.decode import (
    SampleLimits,
    decode,
    decode_labeled,
    reserve,
    sample_from_members,
)
from pipelines.encode import Encoded, encode
from pipelines.sample import Sample
from pipelines.tasks import Progress, ShardTask
from storage.commit import ClaimPolicy
from storage.label_format import DISP_LEVELS, label_size, parse_label_size
from storage.objectstore import ObjectStore
from storage.shards import UngroupedKeys, iter_tar_samples
from storage.sink import ShardSink
from storage.stores import locate

GROUND_TRUTH = "ground-truth"   # the manifest's `teacher` of a ground-truth conversion


@dataclass(frozen=True)
class Labelers:
    """What labels the samples of one worker: a teacher, or the samples' own ground truth
    (``ground_truth`` set, ``teacher`` None); and the sky model, if any. ``keep_depth``: a
    metric teacher's depth is kept as a member too (``depth.png``, pipelines.encode)."""

    teacher: Teacher | None
    sky: SkySegmenter | None = None
    ground_truth: GroundTruthRule | None = None
    keep_depth: bool = False
    label_size: str | int = "image"   # storage.label_format.label_size's rule (job.json pins it)
    draft_decode: bool = False        # JPEGs decoded at the DCT scale the models need (decode_size)
    device_labels: bool | None = None  # labels made on the teacher's device; None: on a GPU (labels_on_device)

    def __post_init__(self):
        if (self.teacher is None) == (self.ground_truth is None):
            raise ValueError("label with a teacher or with ground truth, exactly one of them")
        if self.keep_depth and getattr(self.teacher, "output", None) not in METRIC_OUTPUTS:
            raise ValueError("keep_depth needs a teacher that outputs metric depth")
        if self.ground_truth is not None and self.label_size != "image":
            raise ValueError("a ground-truth conversion keeps labels at the image's size (--label-size image)")
        parse_label_size(self.label_size)
        if self.draft_decode and self.teacher is None:
            raise ValueError("draft decoding needs a teacher (ground truth is read at the image's size)")

    def label_shape(self, height: int, width: int) -> tuple[int, int]:
        """The size of the labels of a height x width image under ``label_size``."""
        if self.label_size == "image":
            return height, width
        return label_size(self.label_size, height, width, min(self.teacher.target_size(height, width)))

    @property
    def source_kind(self) -> str:
        return "pseudo" if self.teacher else "gt"

    @property
    def names(self) -> dict:
        """What every row and sample json says of the models; ``teacher_output`` also tells
        encode how to read the raw output (None: ground truth, already disparity)."""
        return {"teacher": self.teacher.name if self.teacher else GROUND_TRUTH,
                "teacher_output": self.teacher.output if self.teacher else None,
                "sky_model": self.sky.name if self.sky else "none"}

    @property
    def device(self):
        """Where the models run (None: no model, a ground-truth conversion without sky)."""
        return next((m.device for m in (self.teacher, self.sky) if m is not None), None)

    @property
    def labels_on_device(self) -> bool:
        """Whether the teacher makes the label where its output is (labelers.device_label): a
        transformers teacher on a GPU, unless its metres are kept too (--keep-depth needs them)."""
        if not isinstance(self.teacher, Teacher) or self.keep_depth:
            return False
        return self.device_labels if self.device_labels is not None else self.teacher.device.type == "cuda"

    def decode_size(self, height: int, width: int) -> tuple[int, int]:
        """The least (height, width) a height x width image must decode to: what each model sees."""
        sizes = [m.target_size(height, width) for m in (self.teacher, self.sky) if m is not None]
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def decode(self, sample: Sample, limits: SampleLimits = SampleLimits()) -> Sample:
        if self.teacher is None:
            return decode_labeled(sample, self.ground_truth, limits)
        return decode(sample, limits, self.decode_size if self.draft_decode else None)

    def batch_key(self, sample: Sample):
        """Samples that can share a forward pass: same teacher input size."""
        return self.teacher.target_size(sample.height, sample.width) if self.teacher else None


@dataclass
class ShardResult:
    """What one shard attempt did: the counters the engine sums for its summary."""

    name: str
    source: str
    samples: int = 0
    ok: int = 0
    errors: int = 0
    tar_size: int = 0
    seconds: float = 0.0           # wall time of the attempt
    model_seconds: float = 0.0     # time inside sky + teacher
    stage_seconds: dict = field(default_factory=dict)   # decode/sky/teacher/encode/write/commit sums
    worker: str = ""
    attempt: int = 1
    committed: bool = True         # False: another attempt had committed the shard already
    error_reasons: dict = field(default_factory=dict)   # error row reason -> rows (the metrics' classes)


def label_batch(batch: list[Sample], labelers: Labelers) -> float:
    """Sky then teacher over one batch of decoded samples; returns model seconds. Ground
    truth samples keep the raw disparity their decode stage read. On a GPU the images are
    uploaded once, for both models."""
    t0 = time.perf_counter()
    images = [s.image for s in batch]
    if labelers.device is not None:
        images = upload(images, labelers.device)
    shapes = [labelers.label_shape(s.height, s.width) for s in batch]   # from the image's size, not the array's
    sizes = {} if all(shape == s.image.shape[:2] for shape, s in zip(shapes, batch)) else {"sizes": shapes}
    masks = labelers.sky.masks(images, **sizes) if labelers.sky else [None] * len(batch)
    t1 = time.perf_counter()
    if labelers.labels_on_device:
        sizes.update(skies=[None if isinstance(m, NoLabel) else m for m in masks], levels=DISP_LEVELS)
    predictions = labelers.teacher.predict(images, **sizes) if labelers.teacher else [None] * len(batch)
    t2 = time.perf_counter()
    for s, mask, prediction in zip(batch, masks, predictions):
        s.image = None   # the pixels are no longer needed
        if no_label := next((x for x in (mask, prediction) if isinstance(x, NoLabel)), None):
            s.error = no_label.reason   # an error row with the reason, never an "ok" label of NaN
            continue
        s.sky = mask
        if prediction is not None:
            s.raw, s.confidence, s.fov_deg = prediction.raw, prediction.confidence, prediction.fov_deg
            s.label = prediction.label
        if labelers.sky:
            s.timings["sky"] = (t1 - t0) / len(batch)
        if labelers.teacher:
            s.timings["teacher"] = (t2 - t1) / len(batch)
    return t2 - t0


def label_shard(
    task: ShardTask,
    labelers: Labelers,
    output: ObjectStore,
    *,
    batch_size: int = 8,
    threads: int = 4,
    worker: str = "",
    progress: Progress | None = None,
    claim: ClaimPolicy = ClaimPolicy(),
    limits: SampleLimits = SampleLimits(),
) -> ShardResult:
    """Label one input shard into ``output``: the tar is streamed out, completed, and only
    then is the manifest part written (the commit record, see storage.sink). Raises on
    a shard-level failure (unreadable tar, storage error, model error), leaving nothing
    committed and no partial object visible."""
    t_start = time.perf_counter()
    progress = progress or Progress()
    counted = (progress.samples, progress.errors)
    try:
        return _label_shard_once(task, labelers, output, batch_size, threads, worker, progress, claim, limits,
                                 t_start, ungrouped=())
    except UngroupedKeys as e:
        # A key's members were not together: its first group was labeled before it came back. The
        # shard is labeled again, once, with every such key an error row (the first try's upload
        # was aborted, nothing of it is visible).
        progress.samples, progress.errors = counted
        return _label_shard_once(task, labelers, output, batch_size, threads, worker, progress, claim, limits,
                                 t_start, ungrouped=e.keys)


def _label_shard_once(task, labelers, output, batch_size, threads, worker, progress, claim, limits, t_start, *,
                      ungrouped) -> ShardResult:
    result = ShardResult(task.name, task.source, worker=worker, attempt=task.attempt)
    stages = result.stage_seconds

    with ShardSink(output, task.name) as shard:

        def write(enc: Encoded) -> None:
            t0 = time.perf_counter()
            shard.add(enc.key, enc.members, enc.row)
            stages["write"] = stages.get("write", 0.0) + time.perf_counter() - t0

        label_samples(task.source, labelers, write, result=result, progress=progress, batch_size=batch_size,
                      threads=threads, limits=limits, ungrouped=ungrouped)
        t_close = time.perf_counter()
        result.committed = shard.commit(
            {"source_kind": labelers.source_kind, "worker": worker, "attempt": task.attempt},
            owner=owner(worker, task.attempt), claim=claim)
        stages["commit"] = time.perf_counter() - t_close   # completing the upload, the manifest part
    result.tar_size = shard.tar_size
    return finish_result(result, shard.rows, t_start)


def owner(worker: str, attempt: int) -> dict:
    """Who holds a shard's claim: this attempt, uniquely."""
    return {"worker": worker, "attempt": attempt, "id": uuid.uuid4().hex}


def finish_result(result: ShardResult, rows: list[dict], t_start: float) -> ShardResult:
    """The counters of a committed shard from its rows: samples, errors by reason, the stages'
    own timers summed."""
    stages = result.stage_seconds
    for stage in ("decode", "sky", "teacher", "encode"):
        times = [r[f"{stage}_s"] for r in rows if r.get(f"{stage}_s") is not None]
        if times:
            stages[stage] = sum(times)
    result.samples = len(rows)
    result.ok = sum(r["status"] == "ok" for r in rows)
    result.errors = result.samples - result.ok
    for r in rows:
        if r["status"] != "ok":
            result.error_reasons[r["error"]] = result.error_reasons.get(r["error"], 0) + 1
    result.seconds = time.perf_counter() - t_start
    return result


def label_samples(
    source: str,
    labelers: Labelers,
    emit: Callable[[Encoded], None],
    *,
    result: ShardResult,
    progress: Progress,
    wanted: Callable[[str], bool] | None = None,
    batch_size: int = 8,
    threads: int = 4,
    limits: SampleLimits = SampleLimits(),
    ungrouped: Collection[str] = (),
) -> None:
    """Stream input shard ``source`` through decode, the models and encode, and ``emit`` each
    encoded sample in tar order. ``wanted(key)``: only those samples are decoded and labeled
    (a repair); the others are read past. ``ungrouped``: keys whose members are not together
    (storage.shards.UngroupedKeys), each one error row. Model time goes to ``result`` and
    ``progress``."""
    models = labelers.names
    in_store, in_key = locate(source)
    with in_store.open_read(in_key) as stream:
        budget = PixelBudget(limits.inflight_pixels)

        def write(enc: Encoded) -> None:
            emit(enc)
            progress.samples += 1
            progress.errors += enc.row["status"] != "ok"

        def read():   # the reader thread, in tar order: header checks, then the pixels are reserved
            for members in iter_tar_samples(stream, max_member_bytes=limits.max_member_bytes,
                                         max_sample_bytes=limits.max_sample_bytes, ungrouped=ungrouped):
                sample = sample_from_members(members, source)
                if wanted is not None and not wanted(sample.key):
                    continue
                sample.held = budget.acquire(reserve(sample, limits))
                yield sample

        def finish(sample: Sample) -> Encoded:   # encode, then free the arrays and their pixels
            try:
                return encode(sample, models, labelers.keep_depth)
            finally:
                sample.image = sample.raw = sample.label = sample.sky = sample.valid = sample.confidence = None
                budget.release(sample.held)

        with ThreadPoolExecutor(threads, thread_name_prefix="codec") as pool:
            sink = OrderedSink(write, depth=4 * batch_size)
            submit = lambda s: sink.put(pool.submit(finish, s))  # noqa: E731
            half = budget.capacity // 2
            bucketer = Bucketer(batch_size, key=labelers.batch_key, cost=lambda s: s.held,
                                max_batch_cost=half, max_pending_cost=half)
            try:
                decoded = prefetch_map(lambda s: labelers.decode(s, limits), read(), pool, depth=2 * batch_size)
                for sample in decoded:
                    if not sample.ok:
                        submit(sample)
                        continue
                    for batch in bucketer.add(sample):
                        _model_step(batch, labelers, result, progress, submit)
                for batch in bucketer.flush():
                    _model_step(batch, labelers, result, progress, submit)
                sink.close()
            except BaseException:
                sink.abandon()
                raise
            finally:
                budget.close()


def _model_step(batch, labelers, result, progress, submit) -> None:
    seconds = label_batch(batch, labelers)
    result.model_seconds += seconds
    progress.model_seconds += seconds
    for s in batch:
        submit(s)
