"""How far apart two labels of one image are: the figures of `compare`, per sample, and the
deterministic sample draw. Pure numpy, one pair at a time.

The depth agreement is `evaluate`'s protocol and code (pipelines.metrics) with B as the
reference, so "A against B" reads like "a teacher against ground truth": A is aligned to B by a
least-squares scale and shift over the pixels valid and non-sky in both, both become depth,
AbsRel and δ1 compare the depths. The alignment absorbs any affine change, an inverted label
(near is far) included: a negative scale is therefore flagged on its own, whatever the AbsRel.

Disagreement thresholds (THRESHOLDS; a pair beyond any of them is ``disagree``):

- ``abs_rel`` above 0.2: current teachers score an AbsRel of about 0.04-0.13 against ground
  truth on the usual zero-shot benchmarks (NYUv2, KITTI, ETH3D); two labels further apart than
  0.2 cannot both be that good.
- ``delta1`` below 0.8: fewer than 80 % of the pixels within 25 % of each other in depth, where
  those teachers reach 0.87-0.98 against ground truth.
- ``sky_iou`` below 0.5, counted only where either mask covers at least SKY_IOU_MIN_SKY (1 %) of
  the image: the masks disagree on more sky than they agree on; under 1 % a few stray pixels
  would decide the IoU. Sky is disparity 0 (infinitely far): a sky error is a depth error.
- ``inverted`` (scale < 0): always, the worst disagreement there is.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from pipelines.metrics import evaluate_disparity

THRESHOLDS = {"abs_rel": 0.2, "delta1": 0.8, "sky_iou": 0.5}   # abs_rel above; delta1, sky_iou below
SKY_IOU_MIN_SKY = 0.01    # sky_iou is held to its threshold only where a mask covers this share

OK = "ok"
NO_OVERLAP = "no_overlap"   # no pixel valid, non-sky and with B > 0 in both: nothing to align over


@dataclass(frozen=True)
class PairFigures:
    """One pair's agreement, B the reference. Alignment figures are None with ``no_overlap``;
    sky figures are None when neither side has a sky mask."""

    status: str                       # OK | NO_OVERLAP
    pixels: int                       # pixels the alignment and the metrics ran over
    abs_rel: float | None             # evaluate's AbsRel of A aligned to B (depth space)
    delta1: float | None              # evaluate's δ1 (share of pixels within 1.25)
    scale: float | None               # aligned A = scale * A + shift
    shift: float | None
    pearson: float | None             # of the raw labels over the mask; None: a side is constant
    sky_iou: float | None
    sky_fraction_a: float | None
    sky_fraction_b: float | None
    sky_fraction_diff: float | None   # a - b
    inverted: bool                    # scale < 0: near and far swapped
    disagree: bool                    # beyond any of THRESHOLDS, or inverted

    def to_json(self) -> dict:
        return asdict(self)


def beyond(figures: Mapping) -> list[str]:
    """The thresholds a pair crosses (``inverted`` first), from PairFigures or its row dict."""
    crossed = ["inverted"] if figures.get("inverted") else []
    abs_rel, delta1, iou = figures.get("abs_rel"), figures.get("delta1"), figures.get("sky_iou")
    if abs_rel is not None and abs_rel > THRESHOLDS["abs_rel"]:
        crossed.append("abs_rel")
    if delta1 is not None and delta1 < THRESHOLDS["delta1"]:
        crossed.append("delta1")
    sky = max(figures.get("sky_fraction_a") or 0.0, figures.get("sky_fraction_b") or 0.0)
    if iou is not None and iou < THRESHOLDS["sky_iou"] and sky >= SKY_IOU_MIN_SKY:
        crossed.append("sky_iou")
    return crossed


def _mask(mask: np.ndarray | None, shape: tuple, what: str, default: bool) -> np.ndarray:
    if mask is None:
        return np.full(shape, default)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"{what} is {mask.shape}, the labels are {shape}")
    return mask


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    da, db = a - a.mean(), b - b.mean()
    r = float((da * db).sum() / np.sqrt((da * da).sum() * (db * db).sum()))
    return min(1.0, max(-1.0, r))


def compare_labels(a: np.ndarray, b: np.ndarray, sky_a: np.ndarray | None, sky_b: np.ndarray | None,
                   valid_a: np.ndarray | None = None, valid_b: np.ndarray | None = None) -> PairFigures:
    """The figures of label ``a`` against the reference ``b`` (float disparity, one image).

    The mask is: valid in both (``valid.png``; None = every pixel) and sky in neither (None = no
    sky pixel). Within it, evaluate_disparity keeps only B > 0, as it does for ground truth: the
    zero pixels of a normalized B (its farthest point, and all of a degenerate label) are left
    out of the alignment and the metrics, not of ``pearson``. Sky: with a mask on one side only,
    the other is an all-False mask (IoU 0 where the one has sky, fraction 0); two empty masks
    have IoU 1 by definition (they agree). A pair with nothing to align over is NO_OVERLAP, not
    an error. Labels of different shapes are an error (ValueError) naming both.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label shapes differ: A {a.shape}, B {b.shape}")
    shape = a.shape
    sa, sb = _mask(sky_a, shape, "A's sky mask", False), _mask(sky_b, shape, "B's sky mask", False)
    mask = _mask(valid_a, shape, "A's valid mask", True) & _mask(valid_b, shape, "B's valid mask", True) & ~sa & ~sb
    sky: dict = dict.fromkeys(("sky_iou", "sky_fraction_a", "sky_fraction_b", "sky_fraction_diff"))
    if sky_a is not None or sky_b is not None:
        union = int((sa | sb).sum())
        fa, fb = float(sa.mean()), float(sb.mean())
        sky = {"sky_iou": 1.0 if union == 0 else int((sa & sb).sum()) / union,
               "sky_fraction_a": fa, "sky_fraction_b": fb, "sky_fraction_diff": fa - fb}
    try:
        m = evaluate_disparity(pred=a, gt=b, valid=mask)
    except ValueError:      # shapes are checked above: only "no valid pixel to align over" is left
        figures = dict(status=NO_OVERLAP, pixels=0, abs_rel=None, delta1=None, scale=None, shift=None,
                       pearson=None, inverted=False, **sky)
    else:
        figures = dict(status=OK, pixels=m.pixels, abs_rel=m.abs_rel, delta1=m.delta1, scale=m.scale,
                       shift=m.shift, pearson=_pearson(a[mask].astype(np.float64), b[mask].astype(np.float64)),
                       inverted=m.scale < 0, **sky)
    return PairFigures(**figures, disagree=bool(beyond(figures)))


def sampled(shard: str, key: str, fraction: float) -> bool:
    """Whether sample ``key`` of shard ``shard`` is in a ``fraction`` draw: the same answer on
    every machine and run (a hash of "<shard>/<key>", not Python's salted hash()), and the same
    for A and B, whose shards are named alike. 1.0 takes every sample, 0 none."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the sample fraction must be in [0, 1], got {fraction}")
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0 ** 64
