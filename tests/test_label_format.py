"""The label format (storage/label_format.py) against numbers worked out here with numpy and
PIL, and the Output view (storage/output.py) on a local OUTPUT made in the test."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from storage import label_format as fmt
from storage import layout
from storage.output import Output, ShardCounts
from storage.stores import open_store

RNG = np.random.default_rng(7)
SHAPE = (23, 41)


def stored(data: bytes) -> tuple[str, np.ndarray]:
    """What a PNG holds, read by PIL alone."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.mode, np.asarray(im)


def round_half_up(x: np.ndarray) -> np.ndarray:
    """Rounding to the nearest integer; the random values below never fall on a half."""
    return np.floor(x + 0.5)


# -- codecs ---------------------------------------------------------------------------------------

def test_disparity_is_16_bit_d_times_65535_and_reads_back_in_either_dtype():
    d = RNG.uniform(-0.2, 1.2, SHAPE)
    d[0, :3] = [0.0, 1.0, 0.5 / 65535 + 0.25]
    data = fmt.disparity_png(d)
    mode, value = stored(data)
    want = round_half_up(np.minimum(np.maximum(d, 0.0), 1.0) * 65535).astype(np.int64)
    assert mode == "I;16" and value.dtype == np.uint16
    np.testing.assert_array_equal(value.astype(np.int64), want)
    assert value[0, 0] == 0 and value[0, 1] == 65535
    as32 = fmt.read_disparity_png(data)
    as64 = fmt.read_disparity_png(data, np.float64)
    assert as32.dtype == np.float32 and as64.dtype == np.float64
    np.testing.assert_array_equal(as64, want / 65535.0)
    np.testing.assert_array_equal(as32, want.astype(np.float32) / np.float32(65535.0))
    np.testing.assert_allclose(as64, np.clip(d, 0, 1), atol=0.5 / 65535 + 1e-12)


def test_mask_is_8_bit_255_where_it_holds():
    mask = RNG.random(SHAPE) > 0.6
    data = fmt.mask_png(mask)
    mode, value = stored(data)
    assert mode == "L"
    np.testing.assert_array_equal(value, np.where(mask, 255, 0))
    back = fmt.read_mask_png(data)
    assert back.dtype == bool
    np.testing.assert_array_equal(back, mask)


def test_confidence_is_8_bit_c_times_255_non_finite_as_0():
    c = RNG.uniform(-0.1, 1.1, SHAPE).astype(np.float32)
    c[0, :3] = [np.nan, np.inf, -np.inf]
    data = fmt.conf_png(c)
    mode, value = stored(data)
    finite = np.where(np.isfinite(c), c, 0.0).astype(np.float64)
    want = round_half_up(np.minimum(np.maximum(finite, 0.0), 1.0) * 255)
    assert mode == "L"
    np.testing.assert_array_equal(value, want)
    back = fmt.read_conf_png(data)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, want.astype(np.float32) / np.float32(255))


def expected_depth(metres: np.ndarray, sky: np.ndarray | None) -> np.ndarray:
    """The KITTI convention pixel by pixel: round(m * 256) in [1, 65535]; 0 for no depth, for
    sky, and beyond 256 m (65536 and up would be clipped into a real, wrong distance)."""
    want = np.zeros(metres.shape, np.int64)
    for (i, j), m in np.ndenumerate(metres):
        if np.isfinite(m) and m > 0 and (sky is None or not sky[i, j]):
            v = int(round_half_up(m * 256))
            want[i, j] = min(max(v, 1), 65535) if v <= 65536 else 0
    return want


def test_depth_is_metres_times_256_zero_for_none_sky_and_beyond_256_m():
    metres = RNG.uniform(0.5, 300.0, SHAPE)
    metres[0, :6] = [np.nan, np.inf, -3.0, 0.0, 1e-4, 255.999]
    metres[1, :4] = [1.0, 2.0, 3.0, 4.0]
    sky = np.zeros(SHAPE, bool)
    sky[1, :4] = True
    for mask in (sky, None):
        data = fmt.depth_png(metres, mask)
        mode, value = stored(data)
        want = expected_depth(metres, mask)
        assert mode == "I;16"
        np.testing.assert_array_equal(value.astype(np.int64), want)
        back = fmt.read_depth_png(data)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, want.astype(np.float32) / np.float32(256))
    assert value[0, 4] == 1 and value[0, 5] == 65535     # tiny is not "none"; just under 256 m is kept
    assert (metres > 256).any() and (value[metres > 256] == 0).all()
    assert (value[1, :4] > 0).all() and (stored(fmt.depth_png(metres, sky))[1][1, :4] == 0).all()


def _chunks(data: bytes) -> dict[bytes, bytes]:
    """A PNG's chunks by type (IDATs joined), parsed here byte by byte."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        assert struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        i += 12 + n
    return chunks


def _label_arrays() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """Each label PNG the writer makes, of a real scene's map and sky, with the values it must hold
    (worked out with numpy) and its bit depth."""
    from engine.bench.stand_in import image_map, sky_mask

    raw, sky = image_map(97, 143).astype(np.float64), sky_mask(97, 143)
    d = (raw - raw.min()) / (raw.max() - raw.min())
    d[0, :2] = [0.0, 1.0]
    conf = RNG.random(raw.shape)
    metres = 1.0 / (0.05 + raw)
    return {
        "disp.png": (fmt.disparity_png(d), round_half_up(d * 65535).astype(np.uint16), 16),
        "sky.png": (fmt.mask_png(sky), np.where(sky, 255, 0).astype(np.uint8), 8),
        "conf.png": (fmt.conf_png(conf), round_half_up(conf * 255).astype(np.uint8), 8),
        "depth.png": (fmt.depth_png(metres), round_half_up(metres * 256).astype(np.uint16), 16),
    }


@pytest.mark.parametrize("member", ["disp.png", "sky.png", "conf.png", "depth.png"])
def test_every_label_png_is_a_standard_grayscale_png_three_readers_read_bit_exact(member, tmp_path):
    """The writer's codec (libpng, one row filter, zlib level 1) makes plain grayscale PNGs: their
    header says so, the zlib stream says level 1, and Pillow, OpenCV and the webdataset library's
    own reading of a tar (its decoder handed Pillow without conversion) each read the values."""
    import cv2
    import webdataset as wds

    data, want, bits = _label_arrays()[member]
    chunks = _chunks(data)
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (height, width, depth, colour) == (*want.shape, bits, 0)   # colour type 0: grayscale
    assert chunks[b"IDAT"][0] & 0x0F == 8 and chunks[b"IDAT"][1] >> 6 == 0   # deflate, fastest level
    np.testing.assert_array_equal(stored(data)[1], want)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == want.dtype
    np.testing.assert_array_equal(back, want)
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "k", member: data})
    as_stored = wds.handle_extension(member, lambda b: np.asarray(Image.open(io.BytesIO(b))))
    (sample,) = wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode(as_stored)
    np.testing.assert_array_equal(sample[member], want)


def test_quantize_is_the_stored_values_and_float32_stays_float32():
    """quantize_disparity is what disp.png holds, for float32 and float64 labels alike."""
    d32 = RNG.random(SHAPE).astype(np.float32)
    np.testing.assert_array_equal(fmt.quantize_disparity(d32),
                                  np.rint(np.clip(d32, 0.0, 1.0) * np.float32(65535)).astype(np.uint16))
    np.testing.assert_array_equal(stored(fmt.disparity_values_png(fmt.quantize_disparity(d32)))[1],
                                  stored(fmt.disparity_png(d32))[1])
    with pytest.raises(ValueError, match="uint16"):
        fmt.disparity_values_png(d32)


@pytest.mark.parametrize("reader", [fmt.read_disparity_png, fmt.read_mask_png, fmt.read_conf_png,
                                    fmt.read_depth_png])
def test_a_label_member_that_is_not_a_png_is_refused(reader):
    buf = io.BytesIO()
    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(buf, format="BMP")
    with pytest.raises(OSError):
        reader(buf.getvalue())


def test_the_image_member_is_the_first_with_an_image_extension():
    assert fmt.image_member({"__key__": "k", "json": b"", "disp.png": b"", "JPG": b"", "png": b""}) == "JPG"
    assert fmt.image_member(["__key__", "txt", "depth.png"]) is None
    assert fmt.image_member(["webp", "jpg"]) == "webp"
    assert set(fmt.RESERVED) == {"disp.png", "sky.png", "valid.png", "conf.png", "json"}


# -- the Output view --------------------------------------------------------------------------------

def put(store, key: str, data: bytes = b"x") -> None:
    store.put(key, data)


def test_output_from_listings(tmp_path):
    out = Output(open_store(str(tmp_path / "out")))
    assert not out.is_output() and out.job() is None
    put(out.store, "manifest/notes.txt")                  # not a manifest part
    put(out.store, "manifest/deep/x.parquet")             # not one either: a name has no '/'
    assert not out.is_output()
    put(out.store, layout.manifest_key("a"))
    put(out.store, layout.manifest_key("b"))
    put(out.store, layout.failed_key("b"))                # failed, then committed on a retry
    put(out.store, layout.failed_key("c"))
    assert out.is_output()                                # a manifest part, no job.json
    assert out.committed() == {"a", "b"}
    assert out.failed() == {"c"}
    assert out.pending(["e", "a", "c", "d", "b"]) == ["e", "d"]
    assert out.counts(["a", "b", "c", "d", "e"]) == ShardCounts(total=5, committed=2, failed=1, pending=2)
    assert out.counts([]).to_json() == {"total": 0, "committed": 0, "failed": 0, "pending": 0}
    assert out.tar_key("a.tar") == "shards/a.tar" and Output.name_of("a.tar") == "a"
    assert out.tar_key("a/g2.tar") == "shards/a/g2.tar" and Output.name_of("a/g2.tar") == "a"


@pytest.mark.parametrize("name", ["a", "shard-000001", "x.g1", "v1.2.tar.part", "g1", "a b"])
def test_a_shard_file_names_its_shard_and_generation_unambiguously(name):
    for generation in (0, 1, 12):
        assert layout.parse_shard_file(layout.shard_file(name, generation)) == (name, generation)
    assert layout.shard_file("x.g1") != layout.shard_file("x", 1)   # a name that looks like a generation


@pytest.mark.parametrize("bad", ["a", "a/g0.tar", "a/g01.tar", "a/b/g1.tar", "/g1.tar", ".tar", "a/x.tar"])
def test_a_string_that_names_no_shard_tar_is_refused(bad):
    with pytest.raises(ValueError, match="names no shard tar"):
        layout.parse_shard_file(bad)


def test_tar_keys_take_the_generation_from_the_listing_and_the_part_when_two_are_there(tmp_path):
    from storage.manifest import encode_part

    out = Output(open_store(str(tmp_path / "out")))
    for key in ("shards/a.tar", "shards/b/g1.tar", "shards/c.tar", "shards/c/g1.tar"):
        put(out.store, key)
    put(out.store, layout.manifest_key("c"), encode_part([{"key": "k", "shard": "c/g1.tar", "status": "ok"}]))
    assert out.tar_keys(["a", "b", "c"]) == {"a": "shards/a.tar", "b": "shards/b/g1.tar", "c": "shards/c/g1.tar"}


def test_job_json_alone_makes_an_output(tmp_path):
    out = Output(open_store(str(tmp_path / "out")))
    put(out.store, layout.JOB, json.dumps({"shards": ["/in/a.tar"]}).encode())
    assert out.is_output() and out.job() == {"shards": ["/in/a.tar"]}
    assert out.committed() == frozenset() and out.failed() == frozenset()


def test_status_audit_and_resume_count_alike(tmp_path):
    from engine.plan import plan
    from engine.status import status
    from pipelines.audit import shard_counts

    store = open_store(str(tmp_path / "out"))
    inputs = [f"/in/{n}.tar" for n in "abcde"]
    put(store, layout.JOB, json.dumps({"shards": inputs}).encode())
    for key in (layout.manifest_key("a"), layout.manifest_key("b"), layout.failed_key("b"), layout.failed_key("c")):
        put(store, key)
    counts = {"total": 5, "committed": 2, "failed": 1, "pending": 2}
    assert status(store) == {**counts, "failed_shards": ["c"]}
    assert shard_counts(store) == counts
    p = plan(store, inputs)
    assert (p.todo, p.committed, p.failed, p.total) == (["/in/d.tar", "/in/e.tar"], ["a", "b"], ["c"], 5)
    assert plan(store, inputs, retry_failed=True).todo == ["/in/c.tar", "/in/d.tar", "/in/e.tar"]


def test_the_plain_name_fast_path_accepts_only_what_the_full_check_accepts(monkeypatch):
    """storage.names decides plain ASCII names with one regex: it must never let through a name
    the character-by-character rule refuses (random names over the characters that matter)."""
    import random
    import re

    from storage import names

    rng = random.Random(0)
    alphabet = "ab9._-/\\é\x00 ~"
    drawn = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(50_000)]
    drawn += [".", "..", "a/..", "../a", "a/./b", "...", "a//b", "/a", "a/", "x" * 256, "a/" + "y" * 256]
    fast = [n for n in drawn if names._PLAIN.fullmatch(n)]
    assert len(fast) > 1000
    monkeypatch.setattr(names, "_PLAIN", re.compile(r"(?!)"))          # the full check alone
    assert [n for n in fast if names.check_member_name(n) is not None] == []
