"""Image bytes -> the RGB array the models see (SPEC §5.1: after EXIF orientation, RGB), within
the worker's limits.

A crawl holds images nobody here wrote, so the header is checked before a pixel is decoded:
the pixel count (``--max-image-pixels``), the aspect ratio (``--max-aspect``) and, for JPEG,
whether the file is long enough to hold the scans its header claims. libjpeg fills missing
scans with grey and reports success, so a 1 KB file claiming 9000x9000 would otherwise decode
"ok" into 243 MB of grey; the same fill at the bottom of a decoded JPEG is refused too, and so
are the other short reads a decoder calls success (pipelines.whole_image).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelers.ground_truth import GroundTruthError, GroundTruthRule, decode_ground_truth
from pipelines.sample import Sample
from pipelines.whole_image import jpeg_scans_missing, png_rows_missing
from storage.label_format import image_member
from storage.shards import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_SAMPLE_BYTES

# The engine's own limit (SampleLimits.max_pixels), checked from the header, replaces Pillow's
# process-wide one: Pillow's is a warning whose filter is not thread-safe, and decode runs in threads.
Image.MAX_IMAGE_PIXELS = None

# PNG/TIFF modes that carry more than 8 bits per channel.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# A Huffman-coded JPEG spends at least one bit per 8x8 luma block (its DC code); real files spend
# two or more even on a flat image. Arithmetic coding can go below, so it is not held to this.
_JPEG_MIN_BITS_PER_BLOCK = 1
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}
_JPEG_FILL = 128        # the grey libjpeg decodes missing blocks to
_FILL_ROWS = 8          # one block row


@dataclass(frozen=True)
class SampleLimits:
    """What one sample may cost a worker (README "Limits"). Beyond a limit the sample is an
    error row with the reason; the rest of the shard goes on."""

    max_pixels: int = 128_000_000       # 100 MP cameras and 50 MP phones pass
    max_aspect: float = 8.0             # long side / short side; the teacher's tokens grow with it
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES   # any one tar member, checked before reading
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES   # all of one sample's members, from their headers

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ValueError(f"--max-image-pixels must be >= 1, got {self.max_pixels}")
        if not self.max_aspect >= 1:
            raise ValueError(f"--max-aspect must be >= 1, got {self.max_aspect}")
        if self.max_member_bytes < 1:
            raise ValueError(f"--max-member-bytes must be >= 1, got {self.max_member_bytes}")
        if self.max_sample_bytes < 1:
            raise ValueError(f"--max-sample-bytes must be >= 1, got {self.max_sample_bytes}")

    @property
    def inflight_pixels(self) -> int:
        """Decoded pixels a worker holds at once (read-ahead, batches, encoding): two of the
        largest images allowed, so memory is bounded by pixels whatever the batch size."""
        return 2 * self.max_pixels


class DecodeError(ValueError):
    """The member is not a decodable image; the message is the manifest's reason."""


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3. 16-bit and float grey scale to 8 bits by range,
    palette/CMYK/alpha modes convert through PIL (alpha is dropped, as OpenCV does)."""
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and (bad := a.size - int(np.count_nonzero(np.isfinite(a)))):
            raise DecodeError(f"float image holds {bad} non-finite samples (NaN or inf) of {a.size}: "
                              "its range, and so every pixel, would be undefined")
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def jpeg_coding(data: bytes) -> str | None:
    """'huffman' or 'arithmetic' from the JPEG's frame marker (None: not found)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in _HUFFMAN_SOF:
            return "huffman"
        if marker in _ARITHMETIC_SOF:
            return "arithmetic"
        if marker == 0xDA:          # start of scan before any frame
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_header(img: Image.Image, data: bytes, limits: SampleLimits) -> int:
    """The header's promises against the limits, before decoding; returns the pixel count."""
    width, height = img.size
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if img.format in ("JPEG", "MPO") and jpeg_coding(data) == "huffman":
        blocks = -(-width // 8) * -(-height // 8)
        least = blocks * _JPEG_MIN_BITS_PER_BLOCK // 8
        if len(data) < least:
            raise DecodeError(f"truncated JPEG: {len(data)} bytes cannot hold the {width}x{height} its header "
                              f"claims (at least {least}); the decoder would fill it with grey")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise DecodeError(f"image too large: {width}x{height} = {pixels / 1e6:.1f} MP exceeds "
                          f"--max-image-pixels {limits.max_pixels / 1e6:g} MP")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise DecodeError(f"aspect ratio {aspect:.1f}:1 ({width}x{height}) exceeds --max-aspect {limits.max_aspect:g}")
    return pixels


def _check_jpeg_fill(img: Image.Image) -> None:
    """A JPEG whose scans end early (an end marker mid-image) decodes with its last rows set to
    libjpeg's fill grey: refuse it rather than label grey as a scene. An image that is that grey
    all over passes (its label is flagged degenerate by the audit, not hidden)."""
    if img.format not in ("JPEG", "MPO") or img.mode not in ("L", "RGB") or img.height < _FILL_ROWS:
        return
    last = np.asarray(img.crop((0, img.height - _FILL_ROWS, img.width, img.height)))   # not a full copy
    if (last == _JPEG_FILL).all() and not (np.asarray(img) == _JPEG_FILL).all():
        raise DecodeError("truncated JPEG: its last rows are the decoder's grey fill (scans missing)")


def _check_whole(img: Image.Image, data: bytes) -> None:
    """The decoders' silent short reads (pipelines.whole_image): a progressive JPEG's missing
    scans; a sequential PNG whose image data ends before its rows, looked for only where its last
    row is zero, as such a PNG's is (Pillow refuses an interlaced one itself)."""
    if img.format in ("JPEG", "MPO"):
        reason = jpeg_scans_missing(data)
    elif img.format == "PNG" and not img.info.get("interlace") and \
            not np.asarray(img.crop((0, img.height - 1, img.width, img.height))).any():
        reason = png_rows_missing(data)
    else:
        return
    if reason:
        raise DecodeError(reason)


def probe_image(data: bytes, limits: SampleLimits = SampleLimits()) -> int:
    """Header checks only (cheap: nothing is decoded); returns the pixel count."""
    if not data:
        raise DecodeError("empty image member")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return check_header(img, data, limits)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile header can make any plugin raise anything
        raise DecodeError(f"cannot read image header: {type(e).__name__}: {e}") from None


Reduce = Callable[[int, int], tuple[int, int]]   # an image's (height, width) -> the least it must decode to
_SWAPS_AXES = (5, 6, 7, 8)   # EXIF orientations that turn the stored image by a quarter


def decode_image(data: bytes, limits: SampleLimits = SampleLimits(), reduce: Reduce | None = None) -> np.ndarray:
    """Check the header, decode fully (so truncation is caught here, not in a model), orient."""
    return decode_reduced(data, limits, reduce)[0]


def decode_reduced(data: bytes, limits: SampleLimits = SampleLimits(),
                   reduce: Reduce | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_image, and the image's own (height, width) after orientation. With ``reduce``, a
    JPEG is decoded in the DCT domain at the smallest of 1/2, 1/4, 1/8 scale that still covers
    ``reduce(height, width)`` (libjpeg's scaled IDCT: a fraction of the full decode's time), so
    the array can be smaller than the image; other formats decode at full size."""
    if not data:
        raise DecodeError("empty image member")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_header(img, data, limits)
            stored = img.size
            swap = img.getexif().get(0x0112) in _SWAPS_AXES
            height, width = (img.width, img.height) if swap else (img.height, img.width)
            if reduce is not None and img.format == "JPEG":
                need_h, need_w = reduce(height, width)
                img.draft(img.mode, (need_h, need_w) if swap else (need_w, need_h))
            drafted = img.size != stored
            img.load()
            _check_jpeg_fill(img)
            _check_whole(img, data)
            ImageOps.exif_transpose(img, in_place=True)   # in place: no copy of an upright image
            rgb = to_rgb(img)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - one image's decoder failure is that sample's error row
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DecodeError(f"image has no pixels ({rgb.shape})")
    return np.ascontiguousarray(rgb), (height, width) if drafted else rgb.shape[:2]


def sample_from_members(members: dict, source: str) -> Sample:
    """A WebDataset sample dict -> Sample: the first image member is the image,
    everything else is carried through. A sample the reader refused (``__error__``: a link,
    an oversized or sparse member, an unsafe name) becomes its error row."""
    key = members["__key__"]
    sample = Sample(key=key, source=source)
    if "__error__" in members:
        return sample.fail(members["__error__"])
    sample.image_ext = image_member(members)
    for ext, value in members.items():
        if ext == sample.image_ext:
            sample.image_bytes = value
        elif not ext.startswith("__"):
            sample.extras[ext] = value
    if sample.image_ext is None:
        sample.fail(f"no image member (members: {', '.join(sorted(sample.extras)) or 'none'})")
    elif others := [e for e in sample.extras if image_member([e])]:
        sample.notes.append(f"{len(others) + 1} image members: {sample.image_ext} labeled (the first), "
                            f"{', '.join(others)} carried")
    return sample


def probe(sample: Sample, limits: SampleLimits = SampleLimits()) -> int:
    """Stage 0, in tar order: the header checks; returns the pixels to reserve (0 on error)."""
    if not sample.ok:
        return 0
    try:
        return probe_image(sample.image_bytes, limits)
    except DecodeError as e:
        sample.fail(str(e))
        return 0


BYTES_PER_PIXEL = 20   # a decoded pixel in flight: the image, the teacher's output, the sky mask, the label


def reserve(sample: Sample, limits: SampleLimits = SampleLimits()) -> int:
    """What a sample takes of its worker's budget (pipelines.concurrency.PixelBudget), in pixels:
    its image's, from the header (probe), and its members' bytes at BYTES_PER_PIXEL each, since
    every member is held until the sample is written: a sample of many large members costs
    the worker what as many pixels would."""
    held = len(sample.image_bytes or b"") + sum(len(v) for v in sample.extras.values())
    return probe(sample, limits) + -(-held // BYTES_PER_PIXEL)


def decode(sample: Sample, limits: SampleLimits = SampleLimits(), reduce: Reduce | None = None) -> Sample:
    """Stage 1: fill ``sample.image`` or record why it cannot be. ``sample.height`` and
    ``width`` are the image's own, even where ``reduce`` made the array smaller."""
    if not sample.ok:
        return sample
    t0 = time.perf_counter()
    try:
        sample.image, (sample.height, sample.width) = decode_reduced(sample.image_bytes, limits, reduce)
    except DecodeError as e:
        sample.fail(str(e))
    sample.timings["decode"] = time.perf_counter() - t0
    return sample


def decode_labeled(sample: Sample, rule: GroundTruthRule, limits: SampleLimits = SampleLimits()) -> Sample:
    """Stage 1 of a ground-truth conversion: the image, then its ground truth as the raw
    disparity (SPEC §5.5). A sample without a ground-truth member is an error row."""
    decode(sample, limits)
    if not sample.ok:
        return sample
    t0 = time.perf_counter()
    try:
        gt = decode_ground_truth(sample.extras, rule, (sample.height, sample.width))
        if gt is None:
            sample.fail("no ground-truth member (<key>.depth.<ext> or <key>.disparity.<ext>; "
                        f"members: {', '.join(sorted([sample.image_ext, *sample.extras]))})")
        else:
            sample.raw, sample.valid, sample.ground_truth = gt.disparity, gt.valid, gt.member
    except GroundTruthError as e:
        sample.fail(str(e))
    sample.timings["decode"] += time.perf_counter() - t0
    return sample
