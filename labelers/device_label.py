"""The label made where the teacher's output already is: on a GPU, the conversion to disparity,
the normalization, the quantization to disp.png's uint16 and the statistics run on the device,
and only the 2-byte label (and the 1-byte sky mask, already there) crosses to the host, not a
4-byte float map and the host's float passes over it.

The same arithmetic as the host's (labelers.normalize.normalize_output, then
storage.label_format.quantize_disparity, then pipelines.encode.percentiles), step for step in
the same precisions (float64 for the normalization, float32 for the quantization, IEEE division
and round-half-even on both), so the stored values are the same bits either way; the
percentiles agree with numpy's to float64 rounding (tests/test_device_label.py holds both)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labelers.normalize import DEPTH, DISPARITY, RELATIVE_RANGE_EPS, TEACHER_OUTPUTS

PERCENTILES = (5.0, 50.0, 95.0)


@dataclass(frozen=True, slots=True)
class QuantizedLabel:
    """A label as disp.png stores it, with the manifest's statistics of it."""

    values: np.ndarray            # uint16 HxW: round(d * 65535)
    lo: float                     # min and max of the disparity over V (nan if V is empty)
    hi: float
    degenerate: bool
    output_lo: float              # the same over V in the teacher's own unit (normalize_output)
    output_hi: float
    percentiles: list[float | None]   # p05, p50, p95 of values / 65535 over V


def _disparity(raw: torch.Tensor, output: str) -> torch.Tensor:
    """labelers.normalize.to_disparity: depth -> 1/depth, inverse depth kept, where finite and > 0."""
    if output == DISPARITY:
        return raw
    if output not in TEACHER_OUTPUTS:
        raise ValueError(f"teacher output must be one of {TEACHER_OUTPUTS}, got {output!r}")
    ok = torch.isfinite(raw) & (raw > 0)
    value = torch.reciprocal(raw) if output == DEPTH else raw
    return torch.where(ok, value, torch.full_like(raw, float("nan")))


def _range(x: torch.Tensor, used: torch.Tensor) -> tuple[float, float]:
    lo = torch.where(used, x, torch.full_like(x, float("inf"))).amin()
    hi = torch.where(used, x, torch.full_like(x, float("-inf"))).amax()
    return float(lo), float(hi)


def quantize_on_device(raw: torch.Tensor, output: str, sky: torch.Tensor | None = None, *,
                       levels: int) -> QuantizedLabel:
    """raw: the teacher's float32 HxW output at the label's size, on any device; sky: bool HxW
    there too (True = sky); levels: the stored label's top value (the label format's, given by
    the pipeline: labelers do not know the format). What the host would store and write in the
    row, computed there."""
    if raw.ndim != 2:
        raise ValueError(f"raw output must be HxW, got shape {tuple(raw.shape)}")
    raw = raw.float()
    disparity = _disparity(raw, output)
    used = torch.isfinite(disparity)
    if sky is not None:
        if tuple(sky.shape) != tuple(raw.shape):
            raise ValueError(f"sky mask shape {tuple(sky.shape)} differs from the output's {tuple(raw.shape)}")
        used &= ~sky.to(device=raw.device, dtype=torch.bool)
    nan = float("nan")
    zeros = np.zeros(tuple(raw.shape), np.uint16)
    if not bool(used.any()):
        return QuantizedLabel(zeros, nan, nan, True, nan, nan, [None, None, None])
    lo, hi = _range(disparity, used)
    output_lo, output_hi = _range(raw, used)
    span = hi - lo
    if span <= 0 or span <= RELATIVE_RANGE_EPS * max(abs(lo), abs(hi)):
        return QuantizedLabel(zeros, lo, hi, True, output_lo, output_hi, [None, None, None])
    d = ((disparity.double() - lo) / span).clamp_(0.0, 1.0).float()
    d = torch.where(used, d, torch.zeros_like(d))
    values = torch.round(d * float(levels)).to(torch.int32)
    stats = _percentiles(values[used], levels)
    return QuantizedLabel(values.to(torch.uint16).cpu().numpy(), lo, hi, False, output_lo, output_hi, stats)


def _percentiles(v: torch.Tensor, levels: int) -> list[float | None]:
    """numpy's linear-interpolation percentiles of ``v`` / levels: the two order statistics around
    each virtual index are found on the device, the interpolation done on the host."""
    n = v.numel()
    ordered = torch.sort(v).values
    out = []
    for q in PERCENTILES:
        index = (q / 100.0) * (n - 1)
        below = int(np.floor(index))
        above = min(below + 1, n - 1)
        a, b = (float(x) for x in ordered[[below, above]].cpu())
        t = index - below
        value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)   # numpy's _lerp
        out.append(value / levels)
    return out
