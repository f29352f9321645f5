"""Ground truth from labeled datasets -> the raw disparity the label is normalized from (SPEC §5.5).

A labeled sample holds one member whose name says what it is: ``<key>.depth.<ext>`` (metres,
after ``scale``) or ``<key>.disparity.<ext>``. Depth t becomes disparity 1/t on valid pixels;
stored disparity is used as it is. Invalid pixels (zero, negative, inf, NaN, beyond ``max_depth``)
are NaN in the disparity and False in the mask, and never reach a statistic.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

QUANTITIES = ("depth", "disparity")
FORMATS = ("png", "npy", "pfm", "exr")
# EXR channel names that hold a single depth/disparity value, in order of preference.
EXR_CHANNELS = ("Z", "Y", "R", "depth", "disparity", "D")


class GroundTruthError(ValueError):
    """A ground-truth member that cannot become a label; the message is the manifest's reason."""


@dataclass(frozen=True)
class GroundTruthRule:
    """How stored values become metres (or disparity) and which pixels count as valid.

    ``scale``: stored value / scale = the quantity (KITTI's 16-bit png: 256, NYUv2's mm png: 1000).
    ``max_depth``: depth beyond it is invalid (metric depth only: disparity needs calibration).
    """

    scale: float = 1.0
    max_depth: float | None = None

    def __post_init__(self):
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"--gt-scale must be a positive number, got {self.scale}")
        if self.max_depth is not None and not (np.isfinite(self.max_depth) and self.max_depth > 0):
            raise ValueError(f"--max-depth must be a positive number, got {self.max_depth}")


@dataclass(frozen=True, slots=True)
class GroundTruth:
    disparity: np.ndarray   # float64 HxW, NaN where invalid
    valid: np.ndarray       # bool HxW
    quantity: str           # "depth" or "disparity": what the member held
    member: str             # the member's extension, e.g. "depth.png"


def find_member(extras: dict[str, bytes]) -> tuple[str, str, str] | None:
    """(member extension, quantity, format) of the sample's ground-truth member, or None.
    Two ground-truth members are ambiguous and refused."""
    found = [ext for ext in extras if ext.split(".", 1)[0].lower() in QUANTITIES and "." in ext]
    if len(found) > 1:
        raise GroundTruthError(f"more than one ground-truth member ({', '.join(sorted(found))})")
    if not found:
        return None
    quantity, fmt = found[0].lower().split(".", 1)
    if fmt not in FORMATS:
        raise GroundTruthError(f"ground-truth member {found[0]}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    return found[0], quantity, fmt


def read_values(fmt: str, data: bytes) -> np.ndarray:
    """The stored values of a single-channel map as float64 HxW."""
    try:
        if fmt == "npy":
            values = np.load(io.BytesIO(data), allow_pickle=False)
        elif fmt in ("png", "pfm"):
            with Image.open(io.BytesIO(data), formats=["PNG"] if fmt == "png" else ["PPM"]) as im:
                im.load()
                if im.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                    raise GroundTruthError(f"{fmt} ground truth must be single-channel, got mode {im.mode}")
                values = np.asarray(im)
        else:
            values = _read_exr(data)
    except GroundTruthError:
        raise
    except Exception as e:  # noqa: BLE001 - every reader has its own exception types
        raise GroundTruthError(f"cannot read {fmt} ground truth: {type(e).__name__}: {e}") from None
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim != 2 or not values.size:
        raise GroundTruthError(f"ground truth must be a single-channel HxW map, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.number) and not np.iscomplexobj(values)):
        raise GroundTruthError(f"ground truth has non-numeric dtype {values.dtype}")
    return values.astype(np.float64)


def _read_exr(data: bytes) -> np.ndarray:
    try:
        import OpenEXR
    except ImportError:
        raise GroundTruthError("exr ground truth needs the OpenEXR package "
                               "(pip install 'depth-engine[exr]')") from None
    with OpenEXR.File(io.BytesIO(data), separate_channels=True) as f:
        channels = {name: np.asarray(c.pixels) for name, c in f.channels().items()}
    if len(channels) == 1:
        return next(iter(channels.values()))
    for name in EXR_CHANNELS:
        if name in channels:
            return channels[name]
    raise GroundTruthError(f"exr ground truth has channels {', '.join(sorted(channels))}; "
                           f"expected one channel or one of {', '.join(EXR_CHANNELS)}")


def to_disparity(values: np.ndarray, quantity: str, rule: GroundTruthRule) -> tuple[np.ndarray, np.ndarray]:
    """(disparity with NaN where invalid, valid mask) from stored values."""
    if quantity not in QUANTITIES:
        raise GroundTruthError(f"unknown ground-truth quantity {quantity!r}")
    if quantity == "disparity" and rule.max_depth is not None:
        raise GroundTruthError("--max-depth applies to metric depth; this sample's ground truth is disparity")
    q = values / rule.scale
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        valid = np.isfinite(q) & (q > 0)
        if quantity == "depth" and rule.max_depth is not None:
            valid &= q <= rule.max_depth
        disparity = np.where(valid, 1.0 / q if quantity == "depth" else q, np.nan)
    valid &= np.isfinite(disparity)   # 1/t of a subnormal t
    disparity[~valid] = np.nan
    return disparity, valid


def decode_ground_truth(extras: dict[str, bytes], rule: GroundTruthRule,
                        shape: tuple[int, int] | None = None) -> GroundTruth | None:
    """The sample's ground truth as disparity, checked against the image's (H, W) when given;
    None when the sample has no ground-truth member."""
    found = find_member(extras)
    if found is None:
        return None
    member, quantity, fmt = found
    values = read_values(fmt, extras[member])
    if shape is not None and values.shape != tuple(shape):
        raise GroundTruthError(f"ground truth {member} is {values.shape[1]}x{values.shape[0]} (WxH), "
                               f"the image is {shape[1]}x{shape[0]} after EXIF orientation")
    disparity, valid = to_disparity(values, quantity, rule)
    return GroundTruth(disparity, valid, quantity, member)
