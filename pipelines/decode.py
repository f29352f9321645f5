"""Image bytes -> the RGB array the models see (SPEC §5.1: after EXIF orientation, RGB)."""
from __future__ import annotations

import io
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelers.ground_truth import GroundTruthError, GroundTruthRule, decode_ground_truth
from pipelines.sample import Sample
from storage.shards import IMAGE_EXTENSIONS

# PNG/TIFF modes that carry more than 8 bits per channel.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class DecodeError(ValueError):
    """The member is not a decodable image; the message is the manifest's reason."""


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3. 16-bit and float grey scale to 8 bits by range,
    palette/CMYK/alpha modes convert through PIL (alpha is dropped, as OpenCV does)."""
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
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


def decode_image(data: bytes) -> np.ndarray:
    """Decode fully (so truncation is caught here, not in a model) and orient."""
    if not data:
        raise DecodeError("empty image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = to_rgb(img)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"cannot decode image: {e}") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DecodeError(f"image has no pixels ({rgb.shape})")
    return np.ascontiguousarray(rgb)


def sample_from_members(members: dict, source: str) -> Sample:
    """A WebDataset sample dict -> Sample: the first image member is the image,
    everything else is carried through."""
    key = members["__key__"]
    sample = Sample(key=key, source=source)
    for ext, value in members.items():
        if ext.startswith("__"):
            continue
        if sample.image_ext is None and ext.lower() in IMAGE_EXTENSIONS:
            sample.image_ext, sample.image_bytes = ext, value
        else:
            sample.extras[ext] = value
    if sample.image_ext is None:
        sample.fail(f"no image member (members: {', '.join(sorted(sample.extras)) or 'none'})")
    return sample


def decode(sample: Sample) -> Sample:
    """Stage 1: fill ``sample.image`` or record why it cannot be."""
    if not sample.ok:
        return sample
    t0 = time.perf_counter()
    try:
        sample.image = decode_image(sample.image_bytes)
        sample.height, sample.width = sample.image.shape[:2]
    except DecodeError as e:
        sample.fail(str(e))
    sample.timings["decode"] = time.perf_counter() - t0
    return sample


def decode_labeled(sample: Sample, rule: GroundTruthRule) -> Sample:
    """Stage 1 of a ground-truth conversion: the image, then its ground truth as the raw
    disparity (SPEC §5.5). A sample without a ground-truth member is an error row."""
    decode(sample)
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
