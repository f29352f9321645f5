"""Per-image disparity normalization, the label definition of SPEC §5.4, and the conversion of
a teacher's own output (disparity or metric depth) to the disparity that definition is about."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# hi - lo at or below this share of the magnitude is float noise, not scene structure: dividing
# by it would blow rounding error up to the full 0..1 range.
RELATIVE_RANGE_EPS = 1e-6

# What a teacher's raw output holds (job.json's label.teacher_output).
DISPARITY = "disparity"  # relative disparity: Depth Anything relative checkpoints, MiDaS DPT
DEPTH = "depth"  # metric depth in metres: Depth Anything metric, ZoeDepth, GLPN
INVERSE_DEPTH = "inverse_depth"  # metric inverse depth in 1/m: Depth Pro with its field of view
TEACHER_OUTPUTS = (DISPARITY, DEPTH, INVERSE_DEPTH)
METRIC_OUTPUTS = (DEPTH, INVERSE_DEPTH)  # the kinds that give metres (--keep-depth)


@dataclass(frozen=True, slots=True)
class NormalizedDisparity:
    """A label and the raw range it came from (the manifest's disp_min / disp_max)."""

    disparity: np.ndarray  # float32 HxW in [0, 1]; 0 on sky and invalid pixels
    lo: float  # min raw over V (nan if V is empty)
    hi: float  # max raw over V (nan if V is empty)
    degenerate: bool  # V empty or hi - lo ~ 0: disparity is all 0
    output_lo: float = float("nan")  # the model's own output over V, in its unit (normalize_output)
    output_hi: float = float("nan")
    used: np.ndarray | None = None  # V itself, bool HxW (the manifest's percentiles are over it)


def to_disparity(raw: np.ndarray, output: str) -> np.ndarray:
    """A teacher's output as disparity. Depth becomes 1/depth where it is finite and > 0, and NaN
    elsewhere: such pixels are left out of the normalization like sky, and get d = 0. Without
    this a metric model's labels come out inverted (near becomes far). Metric inverse depth is
    disparity already; its pixels that are not finite and > 0 are left out the same way."""
    if output == DISPARITY:
        return raw
    if output not in TEACHER_OUTPUTS:
        raise ValueError(f"teacher output must be one of {TEACHER_OUTPUTS}, got {output!r}")
    return _reciprocal(raw) if output == DEPTH else _positive(raw)


def to_depth(raw: np.ndarray, output: str) -> np.ndarray:
    """A metric teacher's output in metres (NaN where it has none): what --keep-depth keeps."""
    if output not in METRIC_OUTPUTS:
        raise ValueError(f"only a metric teacher ({', '.join(METRIC_OUTPUTS)}) gives metres, got {output!r}")
    return _positive(raw) if output == DEPTH else _reciprocal(raw)


def _positive(raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    return np.where(np.isfinite(raw) & (raw > 0), raw, np.nan).astype(np.float32)


def _reciprocal(raw: np.ndarray) -> np.ndarray:
    """1/raw where raw is finite and > 0, NaN elsewhere."""
    raw = np.asarray(raw)
    out = np.full(raw.shape, np.nan, dtype=np.float32)
    ok = np.isfinite(raw) & (raw > 0)
    with np.errstate(over="ignore"):   # 1/denormal = inf: not finite, so left out too
        np.divide(1.0, raw, out=out, where=ok)
    return out


def normalize_output(
    raw: np.ndarray, output: str, sky: np.ndarray | None = None, valid: np.ndarray | None = None
) -> NormalizedDisparity:
    """normalize_disparity of the teacher's output turned into disparity; output_lo/hi keep the
    range of the output itself (metres for depth, 1/m for inverse depth) over the pixels the
    label was normalized on."""
    disparity = to_disparity(raw, output)
    label = normalize_disparity(disparity, sky, valid)
    if not label.used.any():
        return label
    output_lo, output_hi = _range(np.asarray(raw), label.used)
    return replace(label, output_lo=output_lo, output_hi=output_hi)


def _pixels(raw: np.ndarray, sky: np.ndarray | None, valid: np.ndarray | None) -> np.ndarray:
    """V = ~sky & valid & finite(raw), the pixels a label is normalized over."""
    v = np.isfinite(raw)
    for name, mask in (("sky", sky), ("valid", valid)):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != raw.shape:
            raise ValueError(f"{name} mask shape {mask.shape} differs from disparity {raw.shape}")
        v &= ~mask if name == "sky" else mask
    return v


def normalize_disparity(
    raw: np.ndarray, sky: np.ndarray | None = None, valid: np.ndarray | None = None
) -> NormalizedDisparity:
    """d = clip((r - lo) / (hi - lo), 0, 1) over V = ~sky & valid & finite(r); d = 0 elsewhere.

    lo, hi are the min and max of r over V. The map is degenerate (all zeros) when V is empty or
    hi - lo <= RELATIVE_RANGE_EPS * max(|lo|, |hi|) (which includes hi == lo).
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"raw disparity must be HxW, got shape {raw.shape}")
    v = _pixels(raw, sky, valid)
    out = np.zeros(raw.shape, dtype=np.float32)
    if not v.any():
        return NormalizedDisparity(out, float("nan"), float("nan"), True, used=v)
    lo, hi = _range(raw, v)
    span = hi - lo
    if span <= 0 or span <= RELATIVE_RANGE_EPS * max(abs(lo), abs(hi)):
        return NormalizedDisparity(out, lo, hi, True, used=v)
    for rows in _row_blocks(raw.shape):   # float64 arithmetic, one block of rows at a time
        r = raw[rows].astype(np.float64)
        r -= lo
        r /= span
        np.clip(r, 0.0, 1.0, out=r)
        np.copyto(out[rows], r, where=v[rows], casting="same_kind")
    return NormalizedDisparity(out, lo, hi, False, used=v)


BLOCK_PIXELS = 1 << 16   # the float64 temporaries of a normalization: 512 KiB, whatever the label's size


def _row_blocks(shape: tuple[int, int]):
    rows = max(1, BLOCK_PIXELS // max(1, shape[1]))
    return (slice(i, i + rows) for i in range(0, shape[0], rows))


def _range(values: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """min and max of ``values`` over ``where`` (not empty), without copying the pixels out."""
    return (float(np.min(values, where=where, initial=np.inf)),
            float(np.max(values, where=where, initial=-np.inf)))
