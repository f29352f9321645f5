"""Hostile images and metadata: every limit refuses the sample before it costs memory, the rest
of the shard is labeled, and what passes is decoded exactly as Pillow decodes it."""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from builders import encode
from PIL import Image

from engine.bench.synthetic import lying_jpeg, scene
from pipelines.concurrency import Bucketer, PixelBudget
from pipelines.decode import DecodeError, SampleLimits, decode_image, probe_image
from pipelines.encode import MAX_INPUT_JSON_DEPTH, carried_metadata


def cut_jpeg(height=256, width=320, keep=0.5) -> bytes:
    """A real photo JPEG whose scan is cut at ``keep`` and closed with an end marker."""
    data = encode(scene(height, width, 3), "JPEG", quality=92)
    sos = data.index(b"\xff\xda")
    cut = sos + int((len(data) - sos) * keep)
    return data[:cut] + b"\xff\xd9"


def test_a_jpeg_header_that_lies_is_refused_from_the_header():
    data = lying_jpeg(4000, 3000)
    # The hazard, shown by Pillow alone: it "decodes" into 36 MB of grey and reports success.
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.size == (4000, 3000) and (np.asarray(im)[-100:] == 128).all()
    for check in (probe_image, decode_image):   # the header check alone refuses it
        with pytest.raises(DecodeError, match=r"truncated JPEG: \d+ bytes cannot hold the 4000x3000"):
            check(data)


def test_a_jpeg_cut_short_with_an_end_marker_is_refused():
    data = cut_jpeg()
    with Image.open(io.BytesIO(data)) as im:     # Pillow: "ok", bottom half grey
        im.load()
        assert (np.asarray(im)[-8:] == 128).all()
    probe_image(data)                            # long enough: only the decoded fill shows it
    with pytest.raises(DecodeError, match="grey fill"):
        decode_image(data)
    whole = encode(scene(256, 320, 3), "JPEG", quality=92)
    assert np.array_equal(decode_image(whole), np.asarray(Image.open(io.BytesIO(whole)).convert("RGB")))


@pytest.mark.parametrize("value", [0, 128, 255])
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"progressive": True, "optimize": True}])
def test_flat_jpegs_are_not_taken_for_truncated_ones(value, mode, options):
    """The smallest honest JPEGs there are (one flat colour, optimized Huffman tables) pass the
    length rule with room to spare, and equal Pillow's decode."""
    im = Image.new(mode, (1024, 768), value if mode == "L" else (value,) * 3)
    data = encode(im, "JPEG", **options)
    got = decode_image(data)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(got, want)


def test_pixel_limit_is_read_from_the_header():
    data = encode(scene(200, 300, 1), "PNG")
    limits = SampleLimits(max_pixels=59_999)
    with pytest.raises(DecodeError, match=r"300x200 = 0.1 MP exceeds --max-image-pixels"):
        probe_image(data, limits)
    with pytest.raises(DecodeError, match="exceeds --max-image-pixels"):
        decode_image(data, limits)
    assert decode_image(data, SampleLimits(max_pixels=60_000)).shape == (200, 300, 3)
    # The default admits a 100 MP camera and a 50 MP phone (header only: nothing decoded).
    for width, height in ((11648, 8736), (8160, 6120)):
        assert SampleLimits().max_pixels >= width * height


@pytest.mark.parametrize("height,width,ok", [(10, 400, False), (10, 10000, False), (400, 10, False),
                                             (60, 470, True), (100, 800, True), (100, 801, False)])
def test_aspect_ratio_rule(height, width, ok):
    data = encode(scene(height, width, 2), "PNG")
    if ok:
        assert decode_image(data).shape == (height, width, 3)
    else:
        with pytest.raises(DecodeError, match="exceeds --max-aspect 8"):
            decode_image(data)


def test_a_decoder_that_raises_anything_is_that_samples_error(monkeypatch):
    """Plugins raise more than OSError on hostile bytes (struct.error, IndexError, ...)."""
    from PIL import ImageFile

    def boom(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(DecodeError, match="cannot decode image: IndexError"):
        decode_image(encode(scene(20, 20, 0), "PNG"))


def test_bucketer_bounds_batches_and_what_waits_by_pixels():
    items = [("a", 60), ("a", 60), ("a", 30), ("a", 30), ("a", 30), ("b", 90), ("a", 200)]
    b = Bucketer(8, key=lambda x: x[0], cost=lambda x: x[1], max_batch_cost=100, max_pending_cost=150)
    batches = [batch for item in items for batch in b.add(item)] + b.flush()
    assert sorted(x for batch in batches for x in batch) == sorted(items)       # nothing lost
    for batch in batches:
        assert sum(c for _, c in batch) <= 100 or len(batch) == 1, batch         # one alone may pass
    assert [("a", 200)] in batches
    pending = Bucketer(8, key=lambda x: x[0], cost=lambda x: x[1], max_pending_cost=150)
    for item in items:
        pending.add(item)
        assert pending._pending_cost <= 150


def test_pixel_budget_blocks_caps_and_closes():
    budget = PixelBudget(100)
    assert budget.acquire(500) == 50          # one image takes at most half
    assert budget.acquire(50) == 50
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(10)))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not got      # full: the reader waits
    budget.release(50)
    waiter.join(timeout=10)
    assert got == [10] and budget.used == 60 and budget.peak == 100
    blocked = threading.Thread(target=lambda: got.append(pytest.raises(RuntimeError, budget.acquire, 50)))
    blocked.start()
    budget.close()
    blocked.join(timeout=10)
    assert not blocked.is_alive() and len(got) == 2


def test_input_metadata_never_fails_a_sample():
    notes: list[str] = []
    deep = b"[" * 100_000 + b"]" * 100_000
    assert carried_metadata({"json": deep}, notes) == {} and "nested deeper" in notes[-1]
    just_deep = b"[" * (MAX_INPUT_JSON_DEPTH + 1) + b"]" * (MAX_INPUT_JSON_DEPTH + 1)
    assert carried_metadata({"json": just_deep}, notes) == {} and "nested deeper" in notes[-1]
    fine = b"[" * MAX_INPUT_JSON_DEPTH + b"]" * MAX_INPUT_JSON_DEPTH
    assert "input" in carried_metadata({"json": fine}, notes)
    assert carried_metadata({"json": b"{" + b" " * (2 << 20) + b"}"}, notes) == {} and "exceeds" in notes[-1]
    assert carried_metadata({"json": b"{'not': json}"}, notes) == {} and "not valid JSON" in notes[-1]
    assert carried_metadata({"json": b"caf\xe9"}, notes) == {} and "not valid JSON" in notes[-1]
    meta = carried_metadata({"json": b'{"a": NaN, "b": [Infinity, -Infinity, 1.5]}'}, notes)
    assert meta == {"input": {"a": None, "b": [None, None, 1.5]}} and "3 NaN/Infinity" in notes[-1]
    strict = json.dumps(meta, allow_nan=False)     # raises on NaN: the output json is strict
    assert json.loads(strict, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == meta
