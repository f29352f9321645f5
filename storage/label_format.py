"""The members of a labeled sample and the codec of each label PNG (SPEC §3).

Written once, here, because the writer (pipelines.encode) and every reader (evaluate, verify,
the student loader, the audit page) must agree to the bit: a reader that rescaled by 65536, or
looked for the image under another rule, would read wrong labels without an error. Pure
functions of arrays and bytes; which member a sample carries, and when, is the writer's call.
"""
from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image

# -- member names (the part of a tar member's name after `<key>.`) -------------------------------

DISP_MEMBER = "disp.png"     # the normalized disparity, always present in an ok sample
SKY_MEMBER = "sky.png"       # the sky mask (absent with `--sky none`)
VALID_MEMBER = "valid.png"   # the pixels with ground truth (ground-truth conversions only)
CONF_MEMBER = "conf.png"     # the teacher's confidence, where the teacher gives one
DEPTH_MEMBER = "depth.png"   # metres x 256 (`label --keep-depth`), or an input's, carried through
JSON_MEMBER = "json"         # the sample's metadata
# The engine's own members: an input member of one of these names is replaced, never carried.
# depth.png is not one: an input's ground truth is carried unless --keep-depth writes the teacher's.
RESERVED = (DISP_MEMBER, SKY_MEMBER, VALID_MEMBER, CONF_MEMBER, JSON_MEMBER)
# Every member the engine itself may write beside a sample's own: an input key is accepted only if
# `<key>.<each of these>` is a name the writer takes (storage.shards), so no legal input fails at write.
WRITTEN = (*RESERVED, DEPTH_MEMBER)
# The label PNGs, all at the sample's label size (manifest label_width x label_height): the image's
# own (after EXIF orientation) unless job.json's label.label_size says otherwise (label_size()).
LABEL_SIZED = (DISP_MEMBER, SKY_MEMBER, VALID_MEMBER, CONF_MEMBER)
# Extensions of the image member, compared lowercase.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})


def image_member(members: Iterable[str]) -> str | None:
    """The image member of a sample (a sample dict or its member names, in tar order): the
    first whose extension is an image's; None when there is none."""
    return next((e for e in members if e.lower() in IMAGE_EXTENSIONS), None)


# -- the label's size ------------------------------------------------------------------------------

LABEL_SIZES = ("image", "teacher")   # or a positive int N: the long side capped at N


def parse_label_size(value) -> str | int:
    """``--label-size image|teacher|N`` as job.json keeps it: "image", "teacher" or an int N >= 1."""
    text = str(value).strip().lower()
    if text in LABEL_SIZES:
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--label-size must be image, teacher or a positive long side in pixels, got {value!r}")
    return n


def label_size(rule: str | int, height: int, width: int, teacher_short: int | None = None) -> tuple[int, int]:
    """(height, width) of the labels of a height x width image: the image's own ("image"); the
    image's aspect with the short side at ``teacher_short``, the short side of what the teacher
    sees ("teacher": 518 for Depth Anything, 1536 for Depth Pro's square); or the long side capped
    at N. Never larger than the image: a label is a downscale of the image's grid or the grid
    itself, so pixel (y, x) of a label covers image rows y*H/h .. (y+1)*H/h, and the same columns."""
    if rule == "image":
        return height, width
    if rule == "teacher":
        if not teacher_short:
            raise ValueError("--label-size teacher needs a teacher (a ground-truth conversion keeps the image's size)")
        scale = teacher_short / min(height, width)
    elif isinstance(rule, int) and rule >= 1:
        scale = rule / max(height, width)
    else:
        raise ValueError(f"label size must be image, teacher or a positive int, got {rule!r}")
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def is_label_shape(label: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether a (height, width) label can be a label of a (height, width) image: the image's own
    size, or a downscale of it by one scale s with each side round(side * s) (label_size's rule,
    whatever the rule's length). A label of another aspect, or larger, would be stretched or cut
    by a reader that lays it over the image."""
    (h, w), (big_h, big_w) = label, image
    if (h, w) == (big_h, big_w):
        return True
    if not (1 <= h <= big_h and 1 <= w <= big_w):
        return False
    low = max((h - 0.5) / big_h, (w - 0.5) / big_w)
    high = min((h + 0.5) / big_h, (w + 0.5) / big_w)
    return low <= high + 1e-12 or min(h, w) == 1


def label_row_shape(row: dict) -> tuple[int, int]:
    """A manifest row's label size (height, width); a row from before label_width existed has its
    labels at the image's size."""
    height, width = row.get("label_height"), row.get("label_width")
    return (row["height"], row["width"]) if height is None or width is None else (height, width)


# -- the codecs ------------------------------------------------------------------------------------

# libpng through imagecodecs at zlib level 1 with one fixed row filter per kind of map, the
# fastest standard PNG measured on real disparity (docs/BENCHMARKS.md, "The label codec"): a
# smooth map takes Paeth with run-length matching (~1.8x faster than Pillow's adaptive filters
# at level 1, a few % smaller at the teacher's size), a mask no filter with run-length matching.
PNG_LEVEL = 1
SMOOTH = ("PAETH", "RLE")    # disp.png, conf.png, depth.png: (row filter, zlib strategy)
BINARY = ("NONE", "RLE")     # sky.png, valid.png
DISP_LEVELS = 65535          # disp.png: stored value = round(d * 65535), d the disparity in [0, 1]
MASK_ON = 255                # sky.png / valid.png: 255 where the mask holds, 0 elsewhere
CONF_LEVELS = 255            # conf.png: round(c * 255); 255 = most confident, 0 = least or none
DEPTH_SCALE = 256.0          # depth.png (the KITTI convention): round(metres * 256); 0 = no depth
DEPTH_MAX_VALUE = 65535      # the largest value; depth beyond 256 m is stored as 0 (no depth)


def _png(array: np.ndarray, kind: tuple[str, str] = SMOOTH) -> bytes:
    """A standard grayscale PNG of ``array`` (uint8 or uint16): Pillow, OpenCV and libpng read
    it back bit-exact. The encoder releases the GIL, so codec threads run in parallel."""
    import imagecodecs

    row_filter, strategy = kind
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(array), level=PNG_LEVEL,
                                        filter=imagecodecs.PNG.FILTER[row_filter],
                                        strategy=imagecodecs.PNG.STRATEGY[strategy]))


def _pixels(data: bytes) -> np.ndarray:
    """A label member's stored values; a member named .png that is not a PNG is refused."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        return np.asarray(im)


def quantize_disparity(d: np.ndarray) -> np.ndarray:
    """The values disp.png stores: uint16 round(d * 65535), d clipped to [0, 1]."""
    d = np.asarray(d)
    v = np.clip(d if d.dtype.kind == "f" else d.astype(np.float64), 0.0, 1.0)   # float32 stays float32
    v *= float(DISP_LEVELS)
    return np.rint(v, out=v).astype(np.uint16)


def disparity_png(d: np.ndarray) -> bytes:
    """16-bit grayscale PNG, value = round(d * 65535), d clipped to [0, 1]."""
    return disparity_values_png(quantize_disparity(d))


def disparity_values_png(values: np.ndarray) -> bytes:
    """disp.png of values already quantized (quantize_disparity, or the device's own)."""
    if values.dtype != np.uint16 or values.ndim != 2:
        raise ValueError(f"disp.png holds HxW uint16 values, got {values.dtype} {values.shape}")
    return _png(values)


def read_disparity_png(data: bytes, dtype=np.float32) -> np.ndarray:
    """disp.png -> d in [0, 1] HxW as ``dtype`` (a trainer wants float32, the metrics float64)."""
    dtype = np.dtype(dtype)
    return _pixels(data).astype(dtype) / dtype.type(DISP_LEVELS)


def mask_png(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG, 255 where the mask holds."""
    return _png(np.where(mask, MASK_ON, 0).astype(np.uint8), BINARY)


def read_mask_png(data: bytes) -> np.ndarray:
    """sky.png / valid.png -> bool HxW (any mode, read as 8-bit grey above half)."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        return np.asarray(im.convert("L")) > MASK_ON // 2


def conf_png(confidence: np.ndarray) -> bytes:
    """Confidence as an 8-bit grayscale PNG, value = round(c * 255); non-finite c is 0."""
    c = np.nan_to_num(np.asarray(confidence, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return _png(np.rint(np.clip(c, 0.0, 1.0) * CONF_LEVELS).astype(np.uint8))


def read_conf_png(data: bytes) -> np.ndarray:
    """conf.png -> float32 confidence HxW in [0, 1] (within 1/510 of the teacher's)."""
    value = _pixels(data)
    if value.ndim != 2 or value.dtype != np.uint8:
        raise ValueError(f"conf.png must be single-channel 8-bit, got {value.dtype} {value.shape}")
    return value.astype(np.float32) / np.float32(CONF_LEVELS)


def depth_png(depth: np.ndarray, sky: np.ndarray | None = None) -> bytes:
    """Metric depth as a 16-bit grayscale PNG, value = round(metres * 256), 0 = no depth.

    0 on sky, on non-finite or <= 0 depth, and beyond 256 m (a value clipped to 65535 would read
    as a real, wrong distance). Within 1/256 m everywhere else: a depth in (255.996, 256] m is
    stored as 65535, a positive depth under 1/512 m as 1, not as "no depth"."""
    depth = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(depth) & (depth > 0)
    if sky is not None:
        ok &= ~np.asarray(sky, dtype=bool)
    value = np.rint(np.where(ok, depth, 0.0) * DEPTH_SCALE)
    ok &= value <= DEPTH_MAX_VALUE + 1
    return _png(np.where(ok, np.clip(value, 1, DEPTH_MAX_VALUE), 0).astype(np.uint16))


def read_depth_png(data: bytes) -> np.ndarray:
    """depth.png -> float32 metres HxW, 0 where there is no depth (the file's own convention;
    mask with ``depth > 0``)."""
    value = _pixels(data)
    if value.ndim != 2 or value.dtype.kind not in "iu":
        raise ValueError(f"depth.png must be single-channel 16-bit, got {value.dtype} {value.shape}")
    return (value.astype(np.float32) / np.float32(DEPTH_SCALE)).astype(np.float32)
