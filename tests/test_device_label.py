"""The label made on the teacher's device (labelers.device_label) against the host's (numpy:
labelers.normalize, storage.label_format, pipelines.encode), here on CPU tensors: the same stored
bits, the same row. On a GPU the same test runs on CUDA tensors (tests/test_cuda.py)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from builders import photo_samples, write_shard
from PIL import Image

from engine.bench.stand_in import image_map, sky_mask
from labelers.device_label import quantize_on_device
from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.encode import quantized
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.sample import Sample
from pipelines.tasks import ShardTask
from storage.label_format import DISP_LEVELS
from storage.stores import open_store

RNG = np.random.default_rng(5)


def _maps(kind: str, shape: tuple[int, int]) -> np.ndarray:
    disparity = image_map(*shape).astype(np.float32)
    raw = disparity if kind == "disparity" else (1.0 / (0.05 + disparity)).astype(np.float32)
    if kind == "inverse_depth":
        raw = (0.05 + disparity).astype(np.float32)
    for value in (np.nan, -1.0, np.inf, 0.0):     # pixels a teacher may give that are left out
        raw.flat[RNG.integers(0, raw.size, 40)] = value
    return raw


def host(raw: np.ndarray, kind: str, sky: np.ndarray | None):
    return quantized(Sample(key="k", source="s", raw=raw, sky=sky), kind)


def assert_same(device, want) -> None:
    np.testing.assert_array_equal(device.values, want.values)
    assert device.values.dtype == np.uint16
    got = (device.lo, device.hi, device.output_lo, device.output_hi, device.degenerate)
    assert np.array_equal(got, (want.lo, want.hi, want.output_lo, want.output_hi, want.degenerate), equal_nan=True)
    if want.percentiles[0] is None:
        assert device.percentiles == want.percentiles
    else:
        np.testing.assert_allclose(device.percentiles, want.percentiles, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["disparity", "depth", "inverse_depth"])
@pytest.mark.parametrize("shape", [(97, 143), (518, 777)])
@pytest.mark.parametrize("with_sky", [True, False])
def test_the_device_label_is_the_hosts_bit_for_bit(kind, shape, with_sky):
    raw = _maps(kind, shape)
    sky = sky_mask(*shape) if with_sky else None
    device = quantize_on_device(torch.from_numpy(raw), kind, None if sky is None else torch.from_numpy(sky),
                                levels=DISP_LEVELS)
    assert_same(device, host(raw, kind, sky))


def test_degenerate_and_empty_labels_agree():
    flat = np.full((30, 40), 2.5, np.float32)
    all_sky = np.ones((30, 40), bool)
    for raw, sky in ((flat, None), (flat, all_sky), (np.full((30, 40), np.nan, np.float32), None)):
        device = quantize_on_device(torch.from_numpy(raw), "disparity", None if sky is None else torch.from_numpy(sky),
                                    levels=DISP_LEVELS)
        want = host(raw, "disparity", sky)
        assert device.degenerate and want.degenerate and not device.values.any()
        assert_same(device, want)
    with pytest.raises(ValueError, match="sky mask shape"):
        quantize_on_device(torch.zeros(4, 5), "disparity", torch.zeros(5, 4, dtype=torch.bool), levels=DISP_LEVELS)


def _members(store_root) -> dict:
    out = {}
    for tar in sorted(store_root.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                out[m.name] = t.extractfile(m).read()
    return out


@pytest.mark.parametrize("label_size", ["image", 64])
def test_a_shard_labeled_on_the_device_path_is_the_hosts(tmp_path, tiny_models, label_size):
    """The whole flow with a real (tiny) teacher and sky model both ways: the same tar members,
    byte for byte, and the same manifest rows."""
    src = write_shard(tmp_path / "in.tar", photo_samples([(120, 160), (200, 140), (90, 130)]))
    teacher = Teacher.load(tiny_models.teacher, device="cpu", dtype="fp32")
    sky = SkySegmenter.load(tiny_models.sky, device="cpu", dtype="fp32")
    rows = {}
    members = {}
    for on_device in (False, True):
        labelers = Labelers(teacher, sky, label_size=label_size, device_labels=on_device)
        assert labelers.labels_on_device is on_device
        root = tmp_path / f"out-{on_device}"
        label_shard(ShardTask(src, "in"), labelers, open_store(str(root)), batch_size=4, threads=2)
        members[on_device] = _members(root / "shards")
        table = pq.read_table(next((root / "manifest").rglob("*.parquet"))).to_pylist()
        rows[on_device] = {r["key"]: r for r in table}
    assert members[True].keys() == members[False].keys()
    for name, data in members[False].items():
        if name.endswith((".disp.png", ".sky.png")):
            assert members[True][name] == data, name
            if label_size == 64 and name.endswith(".disp.png"):
                assert max(Image.open(io.BytesIO(data)).size) == 64
    for key, row in rows[False].items():
        other = rows[True][key]
        for column in ("disp_min", "disp_max", "output_min", "output_max", "degenerate", "label_width",
                       "label_height", "sky_fraction"):
            assert other[column] == row[column], column
        for column in ("disp_p05", "disp_p50", "disp_p95"):
            assert other[column] == pytest.approx(row[column], abs=1e-7)


def test_keep_depth_and_plugins_keep_the_host_path(tiny_models):
    teacher = Teacher.load(tiny_models.teacher, device="cpu", dtype="fp32")
    assert not Labelers(teacher, None).labels_on_device            # a CPU teacher: the host's, unless asked
    assert Labelers(teacher, None, device_labels=True).labels_on_device
