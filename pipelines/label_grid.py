"""Labels laid over another grid: a reader that meets labels smaller than their image
(``label --label-size``), or two labels of one image at two sizes, brings them to one grid here,
with one rule for all: PIL's bilinear (antialiased when it shrinks) for disparity, a majority of
the covered pixels for masks. Only between sizes storage.label_format.is_label_shape accepts:
anything else would stretch or cut a label silently, so it is refused."""
from __future__ import annotations

import numpy as np
from PIL import Image

from storage.label_format import is_label_shape


def resize_disparity(d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float disparity map at ``shape`` (height, width), bilinear, in its own dtype."""
    if d.shape == tuple(shape):
        return d
    out = Image.fromarray(np.ascontiguousarray(d, dtype=np.float32)).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(out).astype(d.dtype, copy=False)


def resize_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A bool mask at ``shape``: True where most of what a pixel covers is True."""
    if mask is None or mask.shape == tuple(shape):
        return mask
    grey = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).resize((shape[1], shape[0]), Image.BOX)
    return np.asarray(grey) > 127


def check_downscale(label: tuple[int, int], image: tuple[int, int], what: str) -> None:
    if not is_label_shape(tuple(label), tuple(image)):
        raise ValueError(f"{what} is {label[1]}x{label[0]}, neither the image's {image[1]}x{image[0]} "
                         "nor a downscale of it")


def common_grid(a: np.ndarray, b: np.ndarray, masks_a=(), masks_b=()):
    """Two labels of one image at one grid, the smaller's (the larger's detail cannot be
    compared with what the smaller does not hold): (a, b, masks_a, masks_b) at that size."""
    if a.shape == b.shape:
        return a, b, list(masks_a), list(masks_b)
    small = min(a.shape, b.shape, key=lambda s: s[0] * s[1])
    big = b.shape if small == a.shape else a.shape
    check_downscale(small, big, "one label")
    return (resize_disparity(a, small), resize_disparity(b, small),
            [resize_mask(m, small) for m in masks_a], [resize_mask(m, small) for m in masks_b])
