"""The label's arithmetic without full-resolution float copies (labelers.normalize in blocks of
rows, pipelines.encode's percentiles on the stored integers), against plain numpy written here."""
from __future__ import annotations

import numpy as np
import pytest

from engine.bench.stand_in import image_map, sky_mask
from labelers import normalize
from labelers.normalize import normalize_output
from pipelines.encode import percentiles
from storage.label_format import quantize_disparity

RNG = np.random.default_rng(11)


def reference(raw: np.ndarray, sky, valid) -> tuple[np.ndarray, float, float]:
    """SPEC §5.4 the obvious way: the pixels V copied out in float64, min, max, clip."""
    v = np.isfinite(raw)
    if sky is not None:
        v &= ~sky
    if valid is not None:
        v &= valid
    r = raw[v].astype(np.float64)
    lo, hi = r.min(), r.max()
    out = np.zeros(raw.shape, np.float32)
    out[v] = np.clip((r - lo) / (hi - lo), 0.0, 1.0)
    return out, lo, hi


@pytest.mark.parametrize("shape", [(1, 1 << 17), (700, 3), (97, 143), (1500, 2250)])
def test_normalization_in_blocks_is_bit_identical_to_the_obvious_numpy(shape):
    """Row blocks, one row wider than a block, a block taller than the map, a photo: the same bits."""
    raw = (RNG.random(shape) * 40 - 3).astype(np.float32)
    if raw.size > 1:
        raw.flat[RNG.integers(0, raw.size, max(1, raw.size // 50))] = np.nan
        raw.flat[1] = np.inf
    sky = RNG.random(shape) < 0.2
    valid = RNG.random(shape) < 0.9
    for s, v in ((None, None), (sky, None), (sky, valid)):
        if s is not None and not (~s & np.isfinite(raw)).any():
            continue
        want, lo, hi = reference(raw, s, v)
        got = normalize.normalize_disparity(raw, s, v)
        assert not got.degenerate and (got.lo, got.hi) == (lo, hi)
        np.testing.assert_array_equal(got.disparity, want)
        assert got.disparity.dtype == np.float32


def test_output_range_of_a_metric_teacher_is_taken_over_the_same_pixels():
    metres = (RNG.random((64, 80)) * 50 + 0.5).astype(np.float32)
    metres[0, :3] = [0.0, -1.0, np.nan]     # no depth: left out
    sky = np.zeros(metres.shape, bool)
    sky[5:9] = True
    label = normalize_output(metres, "depth", sky)
    used = np.isfinite(metres) & (metres > 0) & ~sky
    assert (label.output_lo, label.output_hi) == (float(metres[used].min()), float(metres[used].max()))
    want, _, _ = reference(np.where(used, 1.0 / np.where(used, metres, 1), np.nan).astype(np.float32), None, None)
    np.testing.assert_array_equal(label.disparity, want)


@pytest.mark.parametrize("size", [(97, 143), (518, 777)])
def test_percentiles_are_numpys_of_the_stored_label_within_half_a_step_of_the_float_one(size):
    raw, sky = image_map(*size), sky_mask(*size)
    label = normalize.normalize_disparity(raw, sky)
    values = quantize_disparity(label.disparity)
    got = percentiles(values, ~sky, label.degenerate)
    stored = np.percentile(values[~sky].astype(np.float64) / 65535, [5, 50, 95])
    np.testing.assert_allclose(got, stored, rtol=0, atol=1e-12)
    floats = np.percentile(label.disparity[~sky], [5, 50, 95])
    assert np.abs(np.array(got) - floats).max() <= 0.5 / 65535 + 1e-9
    assert percentiles(values, None, False) == pytest.approx(np.percentile(values / 65535, [5, 50, 95]), abs=1e-12)
    assert percentiles(values, ~sky, True) == [None, None, None]
    assert percentiles(values, np.zeros_like(sky), False) == [None, None, None]
