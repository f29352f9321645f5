"""The student's loader against real OUTPUTs: one labeled in-process by label_shard with tiny
models, and synthetic ones written by hand (webdataset.TarWriter + a manifest part) whose
labels are a known function of position, so alignment can be checked pixel by pixel."""
from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from builders import bad_members, photo_samples, write_shard
from PIL import Image

from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.student.loader import (
    DepthShards,
    LoaderConfig,
    mixed_batches,
    training_transform,
)
from pipelines.tasks import ShardTask
from storage.manifest import encode_part
from storage.stores import open_store

CROP = 16  # small crops keep the tests fast; one test uses the default 518


# -- OUTPUTs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labeled_output(tmp_path_factory, tiny_models) -> str:
    """5 shards x 4 photos labeled by the real flow; shard 1 also holds an undecodable image."""
    root = tmp_path_factory.mktemp("labeled")
    labelers = Labelers(Teacher.load(tiny_models.teacher, name="tiny-teacher"),
                        SkySegmenter.load(tiny_models.sky, name="tiny-sky"))
    out = open_store(str(root / "out"))
    for i in range(5):
        sizes = [(40 + 6 * j, 56 + 4 * i) if j % 2 else (60 + 4 * i, 44) for j in range(4)]
        samples = photo_samples(sizes, prefix=f"s{i}-", seed=10 * i)
        if i == 1:
            samples.insert(2, {"__key__": "broken", "jpg": bad_members()["truncated"][1]})
        src = write_shard(root / f"in-{i:06d}.tar", samples)
        label_shard(ShardTask(src, f"in-{i:06d}"), labelers, out, batch_size=8, threads=2)
    return str(root / "out")


def manifest_rows(output: str) -> list[dict]:
    """The manifest read with pyarrow alone, not through the loader's code."""
    return pq.read_table(str(Path(output) / "manifest")).to_pylist()


def ok_keys(output: str) -> set[str]:
    return {r["key"] for r in manifest_rows(output) if r["status"] == "ok"}


def png(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def pattern(h: int, w: int, phase: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An image whose channels are its labels: R = disparity (a wave in x, bent in y),
    G = sky, B = valid. Neither symmetric nor periodic enough to hide a shift or a flip."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * x / 17 + 0.8 * np.sin(2 * np.pi * y / 23) + phase)
    sky = np.sin(2 * np.pi * x / 13 + phase) * np.cos(2 * np.pi * y / 11) > 0.2
    valid = (x // 5 + y // 7) % 3 != 0
    image = np.stack([wave * 255, sky * 255, valid * 255], axis=-1).round().astype(np.uint8)
    return image, wave, sky, valid


def write_synthetic_output(root: Path, shards: dict[str, list[dict]]) -> str:
    """An OUTPUT as SPEC §2-4 define it, written without the engine: samples are dicts
    {key, image (uint8 HxWx3, oriented), disp, sky|None, valid|None, exif_rotated, extra_rows}."""
    (root / "shards").mkdir(parents=True)
    (root / "manifest").mkdir()
    for name, samples in shards.items():
        rows = []
        with wds.TarWriter(str(root / "shards" / f"{name}.tar")) as sink:
            for s in samples:
                h, w = s["disp"].shape
                if s.get("exif_rotated"):  # stored turned; EXIF orientation 6 turns it back
                    exif = Image.Exif()
                    exif[0x0112] = 6
                    image = png(np.ascontiguousarray(np.rot90(s["image"], k=1)), exif=exif)
                else:
                    image = png(s["image"])
                member = {"__key__": s["key"], "png": image,
                          "disp.png": png(np.rint(s["disp"] * 65535).astype(np.uint16))}
                if s.get("sky") is not None:
                    member["sky.png"] = png(np.where(s["sky"], 255, 0).astype(np.uint8))
                if s.get("valid") is not None:
                    member["valid.png"] = png(np.where(s["valid"], 255, 0).astype(np.uint8))
                member["json"] = json.dumps({"key": s["key"]}).encode()
                sink.write(member)
                sky = s.get("sky")
                rows.append({"key": s["key"], "shard": f"{name}.tar", "source": f"synthetic/{name}.tar",
                             "status": "ok", "width": w, "height": h,
                             "sky_fraction": None if sky is None else float(sky.mean()),
                             "teacher": "synthetic", "sky_model": "synthetic", "source_kind": "gt"})
            rows += [{"key": k, "shard": f"{name}.tar", "source": f"synthetic/{name}.tar", "status": "ok",
                      "teacher": "synthetic", "sky_model": "synthetic"} for k in s.get("extra_rows", [])]
        (root / "manifest" / f"{name}.parquet").write_bytes(encode_part(rows))
    return str(root)


def synthetic_sample(key: str, h: int, w: int, phase: float, **kw) -> dict:
    image, wave, sky, valid = pattern(h, w, phase)
    return {"key": key, "image": image, "disp": wave, "sky": sky,
            "valid": valid if kw.pop("with_valid", False) else None, **kw}


@pytest.fixture(scope="module")
def synthetic_output(tmp_path_factory) -> str:
    return write_synthetic_output(tmp_path_factory.mktemp("synthetic") / "out", {
        "syn-000000": [synthetic_sample("wide", 60, 90, 0.0),
                       synthetic_sample("turned", 84, 56, 1.0, exif_rotated=True),
                       synthetic_sample("gt", 70, 70, 2.0, with_valid=True)],
        "syn-000001": [synthetic_sample("tall", 96, 48, 3.0, with_valid=True),
                       synthetic_sample("small", 12, 20, 4.0)],   # smaller than the crop: upsampled
    })


def loader_keys(dataset, workers: int = 0) -> list[dict]:
    return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


# -- the transform ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 50), (50, 32), (32, 32)])
def test_transform_takes_the_same_window_of_every_array(shape):
    """No resize needed (shorter side = crop): the output must be an exact window of the input,
    and each label pixel the label of the image pixel at the same place, through any flip."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)
    disp = ((x * 64 + y) / 4096).astype(np.float32)
    valid, sky = (x + 2 * y) % 3 != 0, (x * y) % 5 == 0
    flips, windows = set(), set()
    for i in range(40):
        img, d, v, s = training_transform(image, disp, valid, sky, 32, np.random.default_rng(i), flip=True)
        assert img.shape == (3, 32, 32) and img.dtype == np.float32
        assert d.shape == v.shape == s.shape == (32, 32) and d.dtype == np.float32
        assert v.dtype == s.dtype == np.bool_
        xs, ys = np.rint(img[0] * 255).astype(int), np.rint(img[1] * 255).astype(int)
        assert np.all(img[2] == np.float32(7 / 255))
        np.testing.assert_array_equal(d, disp[ys, xs])
        np.testing.assert_array_equal(v, valid[ys, xs])
        np.testing.assert_array_equal(s, sky[ys, xs])
        step = np.diff(xs[0])
        assert np.all(step == step[0]) and abs(step[0]) == 1 and np.all(xs == xs[0])   # one row order
        assert np.all(np.diff(ys[:, 0]) == 1)
        flips.add(bool(step[0] < 0))
        windows.add((int(ys.min()), int(xs.min())))
    assert flips == {False, True}
    assert len(windows) > 5 if max(h, w) > 32 else windows == {(0, 0)}
    for i in range(20):   # flip=False: columns always ascend
        img = training_transform(image, disp, valid, sky, 32, np.random.default_rng(i), flip=False)[0]
        assert np.all(np.diff(np.rint(img[0, 0] * 255)) == 1)


@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (20, 13)])
def test_transform_resizes_the_shorter_side_then_crops_one_window(shape):
    """With a resize: the output image is exactly one window of the image resized bicubic with
    the shorter side = crop, and the labels are that same window of the labels resized bilinear
    (disparity) and nearest (masks)."""
    h, w = shape
    crop = 40
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    disp = rng.random((h, w), dtype=np.float32)
    valid, sky = rng.random((h, w)) > 0.3, rng.random((h, w)) > 0.6
    rh, rw = (round(h * crop / min(h, w)), round(w * crop / min(h, w)))
    ref_img = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC)).transpose(2, 0, 1) / np.float32(255)
    ref_disp = np.asarray(Image.fromarray(disp).resize((rw, rh), Image.BILINEAR))
    ref_valid, ref_sky = (np.asarray(Image.fromarray(m.astype(np.uint8)).resize((rw, rh), Image.NEAREST)) > 0
                          for m in (valid, sky))
    for seed in range(12):
        img, d, v, s = training_transform(image, disp, valid, sky, crop, np.random.default_rng(seed), flip=True)
        windows = [(t, l, m) for t in range(rh - crop + 1) for l in range(rw - crop + 1) for m in (False, True)
                   if np.array_equal(img, _window(ref_img, t, l, crop, m))]
        assert len(windows) == 1, windows
        t, l, m = windows[0]
        np.testing.assert_allclose(d, _window(ref_disp, t, l, crop, m), atol=1e-6)
        np.testing.assert_array_equal(v, _window(ref_valid, t, l, crop, m))
        np.testing.assert_array_equal(s, _window(ref_sky, t, l, crop, m))


def _window(a: np.ndarray, top: int, left: int, crop: int, mirror: bool) -> np.ndarray:
    out = a[..., top:top + crop, left:left + crop]
    return out[..., ::-1] if mirror else out


def test_labels_stay_aligned_with_the_image_through_the_loader(synthetic_output):
    """Decoding (EXIF orientation included), resize, crop and flip keep each label on its
    pixel: the image channel that encodes a label agrees with the label in every sample."""
    mirrored = 0
    for seed in range(3):
        dataset = DepthShards(LoaderConfig((synthetic_output,), crop=40, seed=seed))
        for epoch in range(4):
            dataset.set_epoch(epoch)
            for s in dataset:
                img = s["image"].numpy()
                assert img.shape == (3, 40, 40) and 0 <= img.min() and img.max() <= 1
                assert pearson(img[0], s["disparity"]) > 0.99, s["key"]
                assert pearson(img[1], s["sky"]) > 0.9, s["key"]
                if s["key"] in ("gt", "tall"):
                    assert pearson(img[2], s["valid"]) > 0.9, s["key"]
                else:
                    assert s["valid"].all(), s["key"]   # no valid.png: every pixel is valid
                flipped_img = img[0, :, ::-1].copy()
                mirrored += pearson(flipped_img, s["disparity"]) < 0.9
    assert mirrored > 0


def test_default_crop_is_518_and_values_are_in_range(labeled_output):
    sample = next(iter(DepthShards(LoaderConfig((labeled_output,)))))
    assert sample["image"].shape == (3, 518, 518) and sample["image"].dtype == torch.float32
    assert sample["disparity"].shape == sample["valid"].shape == sample["sky"].shape == (518, 518)
    assert 0 <= float(sample["disparity"].min()) and float(sample["disparity"].max()) <= 1
    assert sample["valid"].all()                 # pseudo-labels: valid everywhere, sky included
    assert sample["sky"].any()                   # the tiny random segmenter marks some sky
    # sky is disparity 0: away from its border by more than one source pixel (upsampled ~13x
    # here), where bilinear interpolation of the label meets the nearest-resized mask
    near_ground = torch.nn.functional.max_pool2d((~sample["sky"]).float()[None], 31, stride=1, padding=15)[0]
    interior = sample["sky"] & (near_ground == 0)
    assert interior.sum() > 1000 and float(sample["disparity"][interior].max()) < 1e-4


# -- the split ----------------------------------------------------------------------------------

def read_split(output: str, world: int, workers: int, *, epoch: int = 0, seed: int = 0) -> list[dict]:
    seen = []
    for rank in range(world):
        dataset = DepthShards(LoaderConfig((output,), crop=CROP, seed=seed), rank, world)
        dataset.set_epoch(epoch)
        got = loader_keys(dataset, workers)
        assert len(got) == len(dataset) == dataset.rank_sizes()[rank]
        seen += [{**s, "rank": rank} for s in got]
    return seen


def test_every_ok_sample_once_per_epoch_across_ranks_and_workers(labeled_output):
    expected = ok_keys(labeled_output)
    assert len(expected) == 20 and "broken" not in expected
    for epoch in (0, 1):
        seen = read_split(labeled_output, world=2, workers=2, epoch=epoch)
        assert Counter(s["key"] for s in seen) == Counter(expected)
        assert {(s["rank"], s["worker"]) for s in seen} == {(0, 0), (0, 1), (1, 0), (1, 1)}
        by_shard = {}
        for s in seen:   # a shard is one unit: read whole by one worker of one rank
            by_shard.setdefault(s["shard"], set()).add((s["rank"], s["worker"]))
        assert all(len(v) == 1 for v in by_shard.values()) and len(by_shard) == 5
        # 5 shards over 2 ranks: one rank gets a shard more, nothing is dropped or doubled
        assert sorted(Counter(s["rank"] for s in seen).values()) == [8, 12]


def test_order_is_deterministic_per_seed_and_epoch_and_crops_do_not_depend_on_the_split(labeled_output):
    def run(seed, epoch):
        dataset = DepthShards(LoaderConfig((labeled_output,), crop=CROP, seed=seed))
        dataset.set_epoch(epoch)
        return list(dataset)

    first, again = run(0, 0), run(0, 0)
    assert [s["key"] for s in first] == [s["key"] for s in again]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["disparity"], b["disparity"])
               for a, b in zip(first, again))
    other_epoch, other_seed = run(0, 1), run(1, 0)
    assert [s["key"] for s in other_epoch] != [s["key"] for s in first]
    assert [s["key"] for s in other_seed] != [s["key"] for s in first]
    by_key = {s["key"]: s for s in first}
    assert sum(not torch.equal(s["image"], by_key[s["key"]]["image"]) for s in other_epoch) > 10
    # the same sample in the same epoch gets the same crop whichever rank and worker read it
    for s in read_split(labeled_output, world=2, workers=2):
        assert torch.equal(s["image"], by_key[s["key"]]["image"])
        assert torch.equal(s["sky"], by_key[s["key"]]["sky"])


def test_filters_select_rows_of_the_manifest(labeled_output):
    rows = [r for r in manifest_rows(labeled_output) if r["status"] == "ok"]
    threshold = float(np.median([r["sky_fraction"] for r in rows]))
    expected = {r["key"] for r in rows if r["sky_fraction"] < threshold}
    assert 0 < len(expected) < len(rows)

    def keys(flt):
        dataset = DepthShards(LoaderConfig((labeled_output,), crop=CROP, filter=flt))
        got = [s["key"] for s in dataset]
        assert len(got) == len(dataset) == len(set(got))
        return set(got)

    assert keys((ds.field("status") == "ok") & (ds.field("sky_fraction") < threshold)) == expected
    few = sorted(expected)[:3]                                 # a selective filter: kept keys listed
    assert keys(ds.field("key").isin(few)) == set(few)
    top = float(np.quantile([r["sky_fraction"] for r in rows], 0.9))
    assert keys(ds.field("sky_fraction") <= top) == {r["key"] for r in rows if r["sky_fraction"] <= top}
    assert keys(ds.field("status") == "error") == set()        # error rows have nothing to load
    assert keys(None) == {r["key"] for r in rows}


def test_manifest_rows_missing_from_the_tar_are_an_error(tmp_path):
    output = write_synthetic_output(tmp_path / "out", {
        "bad-000000": [synthetic_sample("here", 20, 20, 0.0, extra_rows=["gone"])]})
    with pytest.raises(ValueError, match="manifest lists 2 samples.*holds 1"):
        list(DepthShards(LoaderConfig((output,), crop=CROP)))


# -- S3 -------------------------------------------------------------------------------------------

def test_the_same_output_on_s3_loads_identically(labeled_output, s3_backend, s3_bucket):
    client = s3_backend.client()
    root = Path(labeled_output)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.parts[len(root.parts)] in ("shards", "manifest"):
            client.put_object(Bucket=s3_bucket, Key=f"labels/run-1/{path.relative_to(root).as_posix()}",
                              Body=path.read_bytes())
    url = f"s3://{s3_bucket}/labels/run-1/"
    config = dict(crop=CROP, seed=3, filter=ds.field("sky_fraction") < 0.7)
    local = list(DepthShards(LoaderConfig((labeled_output,), **config)))
    remote_ds = DepthShards(LoaderConfig((url,), **config))
    remote = list(pickle.loads(pickle.dumps(remote_ds)))       # what a spawned worker would get
    assert [s["key"] for s in remote] == [s["key"] for s in local] and len(local) > 10
    for a, b in zip(local, remote):
        assert b["output"] == url and a["shard"] == b["shard"]
        for field in ("image", "disparity", "valid", "sky"):
            assert torch.equal(a[field], b[field]), (a["key"], field)


# -- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 3, 4, 9, 20])
def test_resume_yields_exactly_the_rest(labeled_output, k):
    config = LoaderConfig((labeled_output,), crop=CROP, seed=5)
    full = DepthShards(config)
    full.set_epoch(2)
    everything = list(full)
    first = DepthShards(config)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(k):
        first.mark_consumed(next(it))
    state = json.loads(json.dumps(first.state_dict()))          # a checkpoint is JSON
    resumed = DepthShards(config)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                                         # same epoch: the counts are kept
    rest = list(resumed)
    assert [s["key"] for s in rest] == [s["key"] for s in everything[k:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, everything[k:]))


def test_resume_with_dataloader_workers_counts_per_worker(labeled_output):
    config = LoaderConfig((labeled_output,), crop=CROP, seed=1)
    dataset = DepthShards(config, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    consumed = []
    for i, batch in enumerate(loader):          # workers prefetch past this point: only marks count
        if i == 3:
            break
        dataset.mark_consumed(batch)
        consumed += batch["key"]
    del loader
    state = dataset.state_dict()
    assert sum(state["consumed"].values()) == 6 and state["num_workers"] == 2

    resumed = DepthShards(config, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = [s["key"] for s in loader_keys(resumed, workers=2)]
    everything = [s["key"] for s in loader_keys(DepthShards(config, rank=1, world_size=2), workers=2)]
    assert Counter(consumed + rest) == Counter(everything) and len(set(everything)) == len(everything)

    with pytest.raises(ValueError, match="2 DataLoader workers"):
        list(resumed)                                            # in-process = 1 worker: refused
    with pytest.raises(ValueError, match="world_size"):
        DepthShards(config, rank=1, world_size=3).load_state_dict(state)
    resumed.set_epoch(1)                                         # a new epoch starts from zero
    assert resumed.state_dict()["consumed"] == {} and len(list(resumed)) == len(resumed)


def test_a_changed_output_refuses_the_old_state(labeled_output):
    config = LoaderConfig((labeled_output,), crop=CROP)
    state = DepthShards(config).state_dict()
    narrower = DepthShards(LoaderConfig((labeled_output,), crop=CROP, filter=ds.field("key") != "s0-0000"))
    with pytest.raises(ValueError, match="changed"):
        narrower.load_state_dict(state)
    narrower.load_state_dict({"epoch": 0, "consumed": {"0": 2}})  # a minimal state is accepted


# -- mixed batches ----------------------------------------------------------------------------------

class Counting:
    def __init__(self, items):
        self.items, self.taken = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.taken += 1
        return item


def test_mixed_batches_are_one_labeled_to_two_pseudo(labeled_output, synthetic_output):
    labeled_data = DepthShards(LoaderConfig((synthetic_output,), crop=CROP))       # 5 samples
    pseudo_data = DepthShards(LoaderConfig((labeled_output,), crop=CROP))          # 20 samples
    labeled, pseudo = Counting(labeled_data), Counting(pseudo_data)
    labeled_keys = ok_keys(synthetic_output)
    batches = mixed_batches(labeled, pseudo, batch_size=6)
    first = next(batches)
    assert (labeled.taken, pseudo.taken) == (2, 4)              # nothing read ahead
    labeled_data.mark_consumed(first, where=~first["pseudo"])
    pseudo_data.mark_consumed(first, where=first["pseudo"])
    assert labeled_data.state_dict()["consumed"] == {"0": 2} and pseudo_data.state_dict()["consumed"] == {"0": 4}
    rest = list(batches)
    assert len(rest) == 1                                        # 5 labeled samples make 2 batches
    for batch in [first, *rest]:
        assert batch["pseudo"].tolist() == [False, False, True, True, True, True]
        assert batch["image"].shape == (6, 3, CROP, CROP) and batch["valid"].dtype == torch.bool
        assert batch["disparity"].shape == (6, CROP, CROP) and batch["worker"].shape == (6,)
        assert [k in labeled_keys for k in batch["key"]] == (~batch["pseudo"]).tolist()

    even = next(mixed_batches(iter(DepthShards(LoaderConfig((synthetic_output,), crop=CROP))),
                              iter(DepthShards(LoaderConfig((labeled_output,), crop=CROP))), 4, ratio=(1, 1)))
    assert even["pseudo"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="too small"):
        mixed_batches([], [], 1, ratio=(1, 2))


def test_loader_reads_an_output_written_by_the_label_command(tmp_path, tiny_models):
    """The loader depends only on the documented format: an OUTPUT from `depth-engine label`."""
    import json as _json
    import subprocess
    import sys

    import pyarrow.dataset as pads
    from builders import photo_samples as _photos
    from builders import write_shard as _write

    from pipelines.student.loader import DepthShards, LoaderConfig

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(2):
        _write(raw / f"shard-{i:06d}.tar", _photos([(70, 90), (90, 70), (64, 64)], prefix=f"L{i}-"))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "engine", "label", f"{raw}/", str(out), "--teacher", tiny_models.teacher,
                        "--sky", tiny_models.sky, "--workers", "1", "--json"], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                         "DEPTH_ENGINE_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    assert _json.loads(p.stdout)["samples_ok"] == 6
    want = {r["key"] for r in pads.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()}
    got = [s for s in DepthShards(LoaderConfig(outputs=(str(out),), crop=56))]
    assert sorted(s["key"] for s in got) == sorted(want)
    for s in got:
        assert s["image"].shape == (3, 56, 56) and s["disparity"].shape == (56, 56)
        if s["sky"].sum() > 50:           # sky is far (0) away from edges blurred by the resize
            assert float((s["disparity"][s["sky"]] == 0).float().mean()) > 0.5
