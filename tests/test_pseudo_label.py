"""The pseudo-label flow in-process (no Ray): decoding odd input, label exactness
against SPEC §5 computed independently, and the shard written back as SPEC §3/§4 say."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from builders import bad_members, odd_members, photo_samples, write_shard
from helpers_models import iou, pearson, reference_prediction, reference_sky
from PIL import Image

from labelers.sky import SkySegmenter
from labelers.teacher import Teacher
from pipelines.concurrency import Bucketer, prefetch_map
from pipelines.decode import DecodeError, decode_image
from pipelines.pseudo_label import Labelers, label_shard
from pipelines.tasks import ShardTask
from storage import layout
from storage.stores import open_store


@pytest.fixture(scope="module")
def labelers(tiny_models):
    return Labelers(Teacher.load(tiny_models.teacher, name="tiny-teacher"),
                    SkySegmenter.load(tiny_models.sky, name="tiny-sky"))


def test_odd_images_decode_to_rgb_at_their_oriented_size():
    for key, (ext, data) in odd_members().items():
        rgb = decode_image(data)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, key
        expected = (70, 40) if key == "rotated" else (48, 64)
        assert rgb.shape[:2] == expected, key
    grey16 = decode_image(odd_members()["grey16"][1])
    assert grey16[0, 0, 0] == 0 and grey16[-1, -1, 0] == 255   # full 16-bit range mapped to 8 bits


@pytest.mark.parametrize("key", sorted(bad_members()))
def test_bad_images_raise_with_a_reason(key):
    with pytest.raises(DecodeError) as e:
        decode_image(bad_members()[key][1])
    assert str(e.value)


def test_bucketer_keeps_batches_same_size_and_bounded():
    b = Bucketer(3, key=lambda x: x % 2, max_pending=4)
    batches = [batch for i in range(11) for batch in b.add(i)] + b.flush()
    assert sorted(x for batch in batches for x in batch) == list(range(11))
    assert all(len({x % 2 for x in batch}) == 1 for batch in batches)
    assert all(len(batch) <= 3 for batch in batches)


def test_prefetch_map_keeps_order_and_surfaces_errors_in_place():
    from concurrent.futures import ThreadPoolExecutor

    def items():
        yield from range(5)
        raise OSError("stream broke")

    seen = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="stream broke"):
        for x in prefetch_map(lambda v: v * 10, items(), pool, depth=2):
            seen.append(x)
    assert seen == [0, 10, 20, 30, 40]


def reference_models(tiny_models):
    """SPEC §5 computed apart from the engine, with the models' own classes and processors."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        AutoModelForSemanticSegmentation,
    )

    t = AutoModelForDepthEstimation.from_pretrained(tiny_models.teacher).eval()
    tp = AutoImageProcessor.from_pretrained(tiny_models.teacher)
    s = AutoModelForSemanticSegmentation.from_pretrained(tiny_models.sky).eval()
    sp = AutoImageProcessor.from_pretrained(tiny_models.sky)
    sky_ids = [int(i) for i, n in s.config.id2label.items() if n.strip().lower() == "sky"]
    return (lambda rgb: reference_prediction(t, tp, rgb)), (lambda rgb: reference_sky(s, sp, rgb, sky_ids))


def normalized(raw: np.ndarray, sky: np.ndarray) -> np.ndarray:
    lo, hi = raw[~sky].min(), raw[~sky].max()
    return np.where(sky, 0.0, np.clip((raw - lo) / (hi - lo), 0, 1))


SIZES = [(120, 160), (600, 400), (90, 130), (200, 200), (160, 120), (121, 161), (300, 520)]


def test_label_shard_matches_spec_labels_and_layout(tmp_path, labelers, tiny_models):
    """Several sizes labeled in one batch; portrait 600x400 and small 90x130 are the cases
    where transformers' DPTImageProcessor would resize differently from the official rule."""
    samples = photo_samples(SIZES)
    odd = [{"__key__": k, ext: data} for k, (ext, data) in odd_members().items()]
    bad = [{"__key__": k, ext: data} for k, (ext, data) in bad_members().items()]
    no_image = [{"__key__": "textonly", "txt": b"no picture here"}]
    src = write_shard(tmp_path / "in-000001.tar", samples + odd + bad + no_image)
    out = open_store(str(tmp_path / "out"))

    result = label_shard(ShardTask(src, "in-000001"), labelers, out, batch_size=16, threads=2)

    n_ok = len(samples) + len(odd)
    assert (result.samples, result.ok, result.errors) == (n_ok + 4, n_ok, 4)
    table = pq.read_table(str(tmp_path / "out" / layout.manifest_key("in-000001")))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {s["__key__"] for s in samples + odd + bad + no_image}
    for key in ["truncated", "empty", "notimage", "textonly"]:
        assert rows[key]["status"] == "error" and rows[key]["error"], key
    assert "no image member" in rows["textonly"]["error"]

    tar_path = tmp_path / "out" / layout.shard_key("in-000001")
    got = {s["__key__"]: s for s in wds.WebDataset(str(tar_path), shardshuffle=False)}
    assert set(got) == {k for k, r in rows.items() if r["status"] == "ok"}

    ref_teacher, ref_sky = reference_models(tiny_models)
    originals = {s["__key__"]: s for s in samples}
    for key, s in originals.items():
        o = got[key]
        assert o["jpg"] == s["jpg"]                                   # image unchanged
        assert o["txt"] == s["txt"]                                   # carried through
        meta = json.loads(o["json"])
        assert meta["input"] == s["json"]
        disp = np.asarray(Image.open(io.BytesIO(o["disp.png"])))
        sky = np.asarray(Image.open(io.BytesIO(o["sky.png"]))) == 255
        rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        assert disp.dtype == np.uint16 and disp.shape == rgb.shape[:2]
        want_sky = ref_sky(rgb)
        want = normalized(ref_teacher(rgb), want_sky)
        assert iou(sky, want_sky) > 0.99, key
        assert pearson(disp / 65535.0, want) > 0.999, key
        assert np.all(disp[sky] == 0)
        row = rows[key]
        assert (row["height"], row["width"]) == rgb.shape[:2]
        assert row["sky_fraction"] == pytest.approx(sky.mean(), abs=1e-6)

    rot = np.asarray(Image.open(io.BytesIO(got["rotated"]["disp.png"])))
    assert rot.shape == (70, 40)                                      # after EXIF orientation

    # every member record agrees with the bytes at that offset of the tar
    blob = tar_path.read_bytes()
    with tarfile.open(tar_path) as tf:
        names = {m.name for m in tf.getmembers()}
    for row in rows.values():
        for m in row["members"]:
            assert m["name"] in names
            data = blob[m["offset"]: m["offset"] + m["size"]]
            assert hashlib.sha256(data).hexdigest() == m["sha256"]
        assert row["tar_size"] == len(blob)


def test_a_garbage_shard_commits_nothing(tmp_path, labelers):
    src = tmp_path / "garbage.tar"
    src.write_bytes(b"\x00garbage" * 1000)
    out = open_store(str(tmp_path / "out"))
    with pytest.raises(Exception):
        label_shard(ShardTask(str(src), "garbage"), labelers, out)
    assert list(out.list()) == []


def test_labels_do_not_depend_on_batch_mates(tmp_path, labelers):
    a = {"__key__": "a", "jpg": photo_samples([(150, 250)])[0]["jpg"]}
    mates = photo_samples([(150, 250), (150, 251), (400, 90)], prefix="m", seed=7)
    out = open_store(str(tmp_path / "out"))
    alone = write_shard(tmp_path / "alone.tar", [a])
    crowd = write_shard(tmp_path / "crowd.tar", [a, *mates])
    label_shard(ShardTask(alone, "alone"), labelers, out, batch_size=1)
    label_shard(ShardTask(crowd, "crowd"), labelers, out, batch_size=4)
    read = lambda n: next(s for s in wds.WebDataset(str(tmp_path / "out" / "shards" / f"{n}.tar"),  # noqa: E731
                                                      shardshuffle=False) if s["__key__"] == "a")
    d1 = np.asarray(Image.open(io.BytesIO(read("alone")["disp.png"])), dtype=np.int64)
    d2 = np.asarray(Image.open(io.BytesIO(read("crowd")["disp.png"])), dtype=np.int64)
    assert np.abs(d1 - d2).max() <= 2                                 # float noise, not padding

