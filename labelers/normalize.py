"""Per-image disparity normalization, the label definition of SPEC §5.4."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# hi - lo at or below this share of the magnitude is float noise, not scene structure: dividing
# by it would blow rounding error up to the full 0..1 range.
RELATIVE_RANGE_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class NormalizedDisparity:
    """A label and the raw range it came from (the manifest's disp_min / disp_max)."""

    disparity: np.ndarray  # float32 HxW in [0, 1]; 0 on sky and invalid pixels
    lo: float  # min raw over V (nan if V is empty)
    hi: float  # max raw over V (nan if V is empty)
    degenerate: bool  # V empty or hi - lo ~ 0: disparity is all 0


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
    v = np.isfinite(raw)
    for name, mask in (("sky", sky), ("valid", valid)):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != raw.shape:
            raise ValueError(f"{name} mask shape {mask.shape} differs from disparity {raw.shape}")
        v &= ~mask if name == "sky" else mask

    out = np.zeros(raw.shape, dtype=np.float32)
    if not v.any():
        return NormalizedDisparity(out, float("nan"), float("nan"), True)
    r = raw[v].astype(np.float64)
    lo, hi = float(r.min()), float(r.max())
    span = hi - lo
    if span <= 0 or span <= RELATIVE_RANGE_EPS * max(abs(lo), abs(hi)):
        return NormalizedDisparity(out, lo, hi, True)
    out[v] = np.clip((r - lo) / span, 0.0, 1.0)
    return NormalizedDisparity(out, lo, hi, False)
