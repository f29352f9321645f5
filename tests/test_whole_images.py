"""Images a decoder calls decoded when it read less than the file promises (issue 27, finding 5,
the images' half): each case is built here, shown to decode "successfully" in Pillow (the silent
wrong result), checked against an independent reading of the file (zlib, numpy, the whole
file's decode), and refused by the engine with its reason; whole files of each kind still pass."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from builders import encode
from PIL import Image

from engine.bench.synthetic import scene
from pipelines.decode import DecodeError, decode_image
from pipelines.whole_image import jpeg_scans_missing, png_rows_missing


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def _png(a: np.ndarray, keep: float = 1.0, interlace: bool = False) -> bytes:
    """An RGB PNG written by hand (Pillow writes no interlaced PNG); ``keep``: the fraction of the
    filtered rows the complete zlib stream holds."""
    h, w = a.shape[:2]
    if interlace:
        passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
        raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in a[y0::dy, x0::dx] if row.size)
    else:
        raw = b"".join(b"\0" + row.tobytes() for row in a)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw[: int(len(raw) * keep)]))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("interlace", [False, True], ids=["sequential", "adam7"])
def test_a_png_whose_data_ends_before_its_rows_is_refused(interlace):
    a = scene(64, 48, 3)
    whole = _png(a, interlace=interlace)
    np.testing.assert_array_equal(_pillow(whole), a)                 # the writer is right
    np.testing.assert_array_equal(decode_image(whole), a)
    short = _png(a, keep=0.5, interlace=interlace)
    if interlace:                                                     # Pillow itself refuses it
        with pytest.raises(OSError, match="truncated"):
            _pillow(short)
    else:
        got = _pillow(short)                                          # Pillow: no error, rows zero
        assert got.shape == a.shape and not got[-1].any() and not np.array_equal(got, a)
        assert png_rows_missing(short) and zlib.decompress(short[41:-16]) == zlib.decompress(
            _png(a)[41:-16])[: len(zlib.decompress(short[41:-16]))]   # the data: a prefix of the rows
    with pytest.raises(DecodeError, match=r"truncated PNG: its image data holds \d+ of the \d+ bytes" if not interlace
                       else "truncated"):
        decode_image(short)


def test_a_png_whose_last_rows_are_black_is_a_picture():
    """Letterboxed frames end in exact zeros: the rows are all in the file, so it is labeled."""
    a = scene(64, 48, 4)
    a[-20:] = 0
    for data in (_png(a), encode(a, "PNG"), _png(a, interlace=True)):
        np.testing.assert_array_equal(decode_image(data), a)
        assert png_rows_missing(data) is None


def _cut_with_end_marker(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)] + b"\xff\xd9"


def _scan_starts(data: bytes) -> list[int]:
    """Where each SOS marker is, found by a plain byte search (an independent walk)."""
    return [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]


@pytest.mark.parametrize("scan", [1, 3, 6, -1])
def test_a_progressive_jpeg_cut_between_scans_is_refused(scan):
    """Cut before a scan (the 2nd, 4th, 7th, the last) with an end marker: every later scan is
    missing. libjpeg shows the coarse scans, a blurred image, and reports success."""
    a = scene(240, 320, 5)
    whole = encode(a, "JPEG", quality=90, progressive=True)
    starts = _scan_starts(whole)
    assert len(starts) >= 8                                          # libjpeg's progressive script
    cut = whole[: starts[scan]] + b"\xff\xd9"
    blurred = _pillow(cut)                                            # Pillow: success, no grey rows
    assert blurred.shape == a.shape and not np.array_equal(blurred, _pillow(whole))
    assert not (blurred[-8:] == 128).all()                           # the grey-fill rule cannot see it
    with pytest.raises(DecodeError, match="truncated JPEG: its scans end before every coefficient"):
        decode_image(cut)


@pytest.mark.parametrize("keep", [0.05, 0.3])
def test_a_progressive_jpeg_cut_at_a_byte_before_its_last_scan_is_refused(keep):
    whole = encode(scene(240, 320, 5), "JPEG", quality=90, progressive=True)
    assert int(len(whole) * keep) < _scan_starts(whole)[-1]
    with pytest.raises(DecodeError, match="truncated JPEG"):   # the grey fill inside the DC scan, else the scans
        decode_image(_cut_with_end_marker(whole, keep))


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"optimize": True}, {"subsampling": 0},
                                     {"progressive": True, "subsampling": 2}])
def test_whole_jpegs_pass(options):
    a = scene(120, 160, 6)
    data = encode(a, "JPEG", quality=85, **options)
    assert jpeg_scans_missing(data) is None
    np.testing.assert_array_equal(decode_image(data), _pillow(data))
    grey = encode(Image.fromarray(a).convert("L"), "JPEG", quality=85, **options)
    assert jpeg_scans_missing(grey) is None


def test_a_float_image_with_a_nan_sample_is_refused():
    """One NaN made the range NaN: every pixel black, "ok"."""
    f = scene(32, 40, 7)[..., 0].astype(np.float32) / 7.0
    buf = io.BytesIO()
    Image.fromarray(f, mode="F").save(buf, "TIFF")
    whole = decode_image(buf.getvalue())
    want = np.rint((f - f.min()) * (255.0 / (f.max() - f.min())))    # numpy's own range scaling
    np.testing.assert_array_equal(whole[..., 0], want.astype(np.uint8))
    for bad in (np.nan, np.inf):
        g = f.copy()
        g[5, 7] = bad
        buf = io.BytesIO()
        Image.fromarray(g, mode="F").save(buf, "TIFF")
        with pytest.raises(DecodeError, match="float image holds 1 non-finite samples"):
            decode_image(buf.getvalue())
