"""The student scored during training on a `convert-gt` OUTPUT, with the metric code of
`depth-engine evaluate` (pipelines.metrics), so its AbsRel and δ1 read like evaluate's.

Geometry: the centre square of each image (side: its shorter side) is resized to crop x crop,
bicubic, as the student's input; the prediction is resized back, bilinear, to the square's own
pixels and scored there, so the ground truth is never resampled. The ground truth is the sample's
own member (`depth.*` / `disparity.*`, which convert-gt carries through), read with the rule of
the OUTPUT's job.json (`--gt-scale`, `--max-depth`; the defaults where there is no job.json).
Not `disp.png`: that label is min-max normalized, and its 0 (the farthest valid point) would be
an infinite depth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from labelers.devices import autocast
from labelers.ground_truth import GroundTruthRule, decode_ground_truth
from pipelines.metrics import evaluate_disparity, mean_metrics
from pipelines.student.errors import TrainSetupError
from pipelines.student.loader import LoaderConfig, ShardPlan, decode_rgb, plan_shards
from pipelines.student.model import MEAN, STD
from storage.label_format import image_member
from storage.output import Output
from storage.shards import iter_tar_samples
from storage.stores import open_store


@dataclass(frozen=True)
class ValSet:
    url: str
    rule: GroundTruthRule
    plans: list[ShardPlan]      # the committed shards and their ok samples


@dataclass(frozen=True)
class ValSample:
    key: str
    image: np.ndarray           # float32 (3, crop, crop) in [0, 1]: the centre square, resized
    disparity: np.ndarray       # ground-truth disparity of the centre square, its own size (NaN: invalid)
    valid: np.ndarray           # bool, same size


def open_val(url: str) -> ValSet:
    """The OUTPUT's samples and its ground-truth rule; an OUTPUT of pseudo-labels is refused."""
    job = Output(open_store(url)).job()
    # Not written by the CLI (no job.json): each sample's member says what it holds.
    label = (job.get("label") or {}) if job is not None else {"ground_truth": {}}
    if label.get("ground_truth") is None:
        raise TrainSetupError(f"train-student: --val {url} holds pseudo-labels, not ground truth: "
                              "give it a `depth-engine convert-gt` OUTPUT")
    gt = label["ground_truth"]
    plans = plan_shards(LoaderConfig(outputs=(url,)))
    if not plans:
        raise TrainSetupError(f"train-student: --val {url} holds no committed sample")
    return ValSet(url, GroundTruthRule(gt.get("scale", 1.0), gt.get("max_depth")), plans)


def centre_square(height: int, width: int) -> tuple[slice, slice]:
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return slice(top, top + side), slice(left, left + side)


def val_sample(sample: dict, rule: GroundTruthRule, crop: int) -> ValSample:
    key = sample["__key__"]
    image_ext = image_member(sample)
    if image_ext is None:
        raise ValueError(f"--val sample {key!r} has no image")
    image = decode_rgb(sample[image_ext])
    gt = decode_ground_truth({k: v for k, v in sample.items() if k != "__key__"}, rule, image.shape[:2])
    if gt is None:
        raise ValueError(f"--val sample {key!r} has no ground-truth member (depth.* or disparity.*)")
    rows, cols = centre_square(*image.shape[:2])
    square = Image.fromarray(image[rows, cols]).resize((crop, crop), Image.Resampling.BICUBIC)
    pixels = np.asarray(square).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return ValSample(key, pixels, gt.disparity[rows, cols], gt.valid[rows, cols])


def val_samples(val: ValSet, crop: int) -> Iterator[ValSample]:
    """Streamed shard by shard, every time: a holdout decoded once would sit in memory for the run."""
    output = Output(open_store(val.url))
    for plan in val.plans:
        with output.store.open_read(output.tar_key(plan.shard)) as stream:
            for sample in iter_tar_samples(stream):
                if plan.wants(sample["__key__"]):
                    yield val_sample(sample, val.rule, crop)


@torch.no_grad()
def predict(student, images: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The student's disparity, float32 (B, crop, crop) on the CPU, for images (B, 3, crop, crop) in [0, 1]."""
    x = torch.from_numpy(images).to(device)
    with autocast(device, dtype):
        out = student(pixel_values=(x - MEAN.to(device)) / STD.to(device)).predicted_depth
    return out.float().cpu()


def score(prediction: torch.Tensor, sample: ValSample, max_depth: float | None):
    """evaluate's metrics of one crop-sized prediction, resized back to the sample's square."""
    back = F.interpolate(prediction[None, None], size=sample.valid.shape, mode="bilinear", align_corners=False)
    return evaluate_disparity(back[0, 0].numpy(), sample.disparity, sample.valid, max_depth)


def validate(student, val: ValSet, crop: int, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{"abs_rel", "delta1", "samples"}: means over the samples scored; `unscored` counts those
    that could not be (no valid ground truth in the square, a non-finite prediction)."""
    was_training = student.training
    student.eval()
    scored, unscored = [], 0
    samples = val_samples(val, crop)
    try:
        while batch := [s for _, s in zip(range(batch_size), samples)]:
            for p, s in zip(predict(student, np.stack([s.image for s in batch]), device, dtype), batch):
                try:
                    scored.append(score(p, s, val.rule.max_depth))
                except ValueError:
                    unscored += 1
    finally:
        student.train(was_training)
    return {**mean_metrics(scored), "unscored": unscored}
