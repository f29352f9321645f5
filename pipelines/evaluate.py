"""Teacher evaluation on a labeled shard: how good are the labels before a cluster makes 62M?

    read shard -> decode image + ground truth (+ stored label) -> [bucket by teacher size]
               -> teacher -> AbsRel / δ1 per sample (pipelines.metrics)

The shard is an input shard (image + ``depth.*`` / ``disparity.*`` member) or an output shard
that carries that member: then the label stored beside it (``disp.png``, a pseudo-label or a
converted ground truth) is scored against the same ground truth. Nothing is written; like
``label_shard`` nothing here knows about Ray.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from labelers.ground_truth import (
    GroundTruth,
    GroundTruthError,
    GroundTruthRule,
    decode_ground_truth,
)
from labelers.normalize import DISPARITY, to_disparity
from labelers.prediction import NoLabel
from pipelines.concurrency import Bucketer, prefetch_map
from pipelines.decode import decode, sample_from_members
from pipelines.label_grid import check_downscale, resize_disparity
from pipelines.metrics import SampleMetrics, evaluate_disparity, mean_metrics
from pipelines.sample import Sample
from pipelines.tasks import Progress, ShardTask
from storage.label_format import DISP_MEMBER, read_disparity_png
from storage.shards import iter_tar_samples
from storage.stores import locate


@dataclass
class ShardEvaluation:
    """One shard's per-sample rows and the counters the engine sums."""

    name: str
    source: str
    rows: list[dict] = field(default_factory=list)
    samples: int = 0
    errors: int = 0                 # samples that could not be scored (reason in their row)
    seconds: float = 0.0
    model_seconds: float = 0.0
    worker: str = ""
    attempt: int = 1


@dataclass(slots=True)
class _Item:
    sample: Sample
    gt: GroundTruth | None = None
    stored: np.ndarray | None = None     # the OUTPUT's normalized label, when the shard has one


def _load(members: dict, source: str, rule: GroundTruthRule) -> _Item:
    item = _Item(decode(sample_from_members(members, source)))
    s = item.sample
    if not s.ok:
        return item
    try:
        item.gt = decode_ground_truth(s.extras, rule, (s.height, s.width))
        if item.gt is not None and not item.gt.valid.any():
            s.fail(f"ground truth {item.gt.member} has no valid pixel")
        elif item.gt is not None and DISP_MEMBER in s.extras:
            item.stored = read_disparity_png(s.extras[DISP_MEMBER], np.float64)
            # a label smaller than its image (label --label-size) is scored laid over the ground truth's grid
            check_downscale(item.stored.shape, item.gt.valid.shape, "stored disp.png")
            item.stored = resize_disparity(item.stored, item.gt.valid.shape)
    except GroundTruthError as e:
        s.fail(str(e))
    except (OSError, ValueError) as e:
        s.fail(f"cannot read stored disp.png: {e}")
    s.extras = {}   # bytes no longer needed
    s.image_bytes = None
    return item


def _row(task: ShardTask, item: _Item, teacher: SampleMetrics | None, label: SampleMetrics | None) -> dict:
    s = item.sample
    if not s.ok:
        status, reason = "error", s.error
    elif item.gt is None:
        status, reason = "skipped", "no ground-truth member"
    else:
        status, reason = "ok", None
    return {"shard": task.name, "key": s.key, "status": status, "reason": reason,
            "ground_truth": item.gt.member if item.gt is not None else None,
            "pixels": teacher.pixels if teacher else None,
            "teacher": teacher.to_json() if teacher else None,
            "label": label.to_json() if label else None}


def evaluate_shard(task: ShardTask, teacher, rule: GroundTruthRule = GroundTruthRule(), *,
                   batch_size: int = 8, threads: int = 4, worker: str = "",
                   progress: Progress | None = None) -> ShardEvaluation:
    """Score ``teacher`` (anything with ``predict`` and ``target_size``, as labelers.teacher.Teacher;
    its ``output``, disparity by default, says how to read the prediction) on every sample of one
    shard that has ground truth. Raises on a shard-level failure."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    result = ShardEvaluation(task.name, task.source, worker=worker, attempt=task.attempt)
    store, key = locate(task.source)
    done: dict[int, dict] = {}
    kind = getattr(teacher, "output", DISPARITY)   # a metric teacher is scored on 1/depth

    def finish(i: int, item: _Item, teacher_m: SampleMetrics | None, label_m: SampleMetrics | None) -> None:
        done[i] = _row(task, item, teacher_m, label_m)
        progress.samples += 1
        progress.errors += done[i]["status"] == "error"

    def score(batch: list[tuple[int, _Item]]) -> None:
        m0 = time.perf_counter()
        preds = teacher.predict([item.sample.image for _, item in batch])
        seconds = time.perf_counter() - m0
        result.model_seconds += seconds
        progress.model_seconds += seconds
        for (i, item), pred in zip(batch, preds):
            gt = item.gt
            item.sample.image = None
            if isinstance(pred, NoLabel):       # NaN or inf out of the model: no score, the reason
                item.sample.fail(f"cannot score: {pred.reason}")
                finish(i, item, None, None)
                continue
            pred = to_disparity(pred.raw, kind)
            try:
                teacher_m = evaluate_disparity(pred, gt.disparity, gt.valid, rule.max_depth)
                label_m = None if item.stored is None else evaluate_disparity(
                    item.stored, gt.disparity, gt.valid, rule.max_depth)
            except ValueError as e:      # e.g. no pixel where both are finite
                item.sample.fail(f"cannot score: {e}")
                teacher_m = label_m = None
            finish(i, item, teacher_m, label_m)

    with store.open_read(key) as stream, ThreadPoolExecutor(threads, thread_name_prefix="codec") as pool:
        bucketer = Bucketer(batch_size, key=lambda x: teacher.target_size(x[1].sample.height, x[1].sample.width))
        items = prefetch_map(lambda m: _load(m, task.source, rule), iter_tar_samples(stream), pool,
                             depth=2 * batch_size)
        for i, item in enumerate(items):
            if not item.sample.ok or item.gt is None:
                finish(i, item, None, None)
                continue
            for batch in bucketer.add((i, item)):
                score(batch)
        for batch in bucketer.flush():
            score(batch)

    result.rows = [done[i] for i in sorted(done)]
    result.samples = len(result.rows)
    result.errors = sum(r["status"] == "error" for r in result.rows)
    result.seconds = time.perf_counter() - t0
    return result


def summarize(rows: list[dict]) -> dict:
    """Aggregates over the scored samples: the teacher, and the stored label where there is one."""
    ok = [r for r in rows if r["status"] == "ok"]
    metrics = lambda part: [SampleMetrics(**r[part]) for r in ok if r[part]]  # noqa: E731
    return {
        "samples": len(rows),
        "scored": len(ok),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "teacher": mean_metrics(metrics("teacher")),
        "label": mean_metrics(metrics("label")),
    }
