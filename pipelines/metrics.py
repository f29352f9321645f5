"""Zero-shot depth metrics as the paper reports them (MiDaS protocol): the prediction, a
relative disparity, is aligned to the ground-truth disparity by a least-squares scale and
shift over valid pixels; both become depth; AbsRel and δ1 compare the depths.

Pure numpy, one sample at a time; aggregates are means over samples, as MiDaS's evaluation
and the paper's tables average per-image figures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DELTA1 = 1.25


@dataclass(frozen=True)
class SampleMetrics:
    abs_rel: float      # mean |d_pred - d_gt| / d_gt over valid pixels (depth space)
    delta1: float       # share of valid pixels with max(d_pred/d_gt, d_gt/d_pred) < 1.25
    pixels: int         # valid pixels evaluated
    scale: float        # the alignment: aligned disparity = scale * prediction + shift
    shift: float

    def to_json(self) -> dict:
        return asdict(self)


def align_scale_shift(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(s, b) minimising sum over mask of (s * pred + b - target)^2: the 2x2 normal equations.
    A constant prediction cannot be scaled: s = 0 and b = the mean target."""
    p = pred[mask].astype(np.float64)
    t = target[mask].astype(np.float64)
    n = p.size
    if n == 0:
        raise ValueError("no valid pixel to align over")
    pm, tm = p.mean(), t.mean()
    var = float(((p - pm) ** 2).sum())
    if var <= 1e-12 * max(1.0, float((p ** 2).sum())):
        return 0.0, float(tm)
    s = float(((p - pm) * (t - tm)).sum() / var)
    return s, float(tm - s * pm)


def evaluate_disparity(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                       max_depth: float | None = None) -> SampleMetrics:
    """Metrics of one relative-disparity prediction against ground-truth disparity.

    The aligned disparity is floored at the far limit (1 / ``max_depth``, or the smallest valid
    ground-truth disparity when none is given) so a prediction never turns into a negative or
    infinite depth: MiDaS's depth cap, defaulting to the sample's own farthest point.
    """
    if pred.shape != gt.shape or gt.shape != valid.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, ground truth {gt.shape}, mask {valid.shape}")
    mask = valid & np.isfinite(gt) & (gt > 0) & np.isfinite(pred)
    s, b = align_scale_shift(pred, gt, mask)
    g = gt[mask].astype(np.float64)
    floor = 1.0 / max_depth if max_depth else float(g.min())
    aligned = np.maximum(s * pred[mask].astype(np.float64) + b, floor)
    depth_pred, depth_gt = 1.0 / aligned, 1.0 / g
    abs_rel = float(np.mean(np.abs(depth_pred - depth_gt) / depth_gt))
    ratio = np.maximum(depth_pred / depth_gt, depth_gt / depth_pred)
    return SampleMetrics(abs_rel, float(np.mean(ratio < DELTA1)), int(mask.sum()), s, b)


def mean_metrics(samples: list[SampleMetrics]) -> dict:
    """The aggregate row: means over samples (each image weighs the same)."""
    if not samples:
        return {"samples": 0, "abs_rel": None, "delta1": None}
    return {"samples": len(samples),
            "abs_rel": float(np.mean([m.abs_rel for m in samples])),
            "delta1": float(np.mean([m.delta1 for m in samples]))}
