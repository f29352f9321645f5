"""A stand-in accelerator: a teacher and a sky model whose outputs have a real scene's statistics
and whose model step costs a set time per image without holding a core or the GIL.

A random-weight teacher's map is nearly constant, so its labels compress to ~0.1 bit per pixel
and encode in no time: figures about label bytes or encode taken with it are ~100x too kind.
The stand-in's map is the Middlebury motorcycle's ground-truth disparity (scikit-image), holes
filled from their nearest measured pixel, taken to the teacher's output resolution (518 on the
short side, Depth Anything's) and bilinearly back to the image's size, as a teacher's output is
(tests hold its disp.png within the ground truth's own bytes per pixel). Its sky is a wavy
horizon band.

On a GPU node the model step and the resize back run on the device; what reaches the host is a
float32 map at the image's size. The stand-in sleeps ``1 / rate`` seconds per image (the
device's time) and hands out a copy of a map computed once per size (the host's share: a
device-to-host copy), so a CPU machine measures the rate the rest of the engine sustains.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from labelers.geometry import teacher_input_size
from labelers.normalize import DISPARITY
from labelers.prediction import Prediction

TEACHER_SHORT_SIDE = 518     # Depth Anything's input (and output) short side
PATCH = 14                   # its inputs are multiples of the ViT patch
SKY_TOP = 0.18               # the horizon band's mean height, a share of the image's height


@lru_cache(maxsize=1)
def reference_disparity() -> np.ndarray:
    """The motorcycle's ground-truth disparity (500x741 float32), every pixel finite: the 7 %
    without a measurement take their nearest measured neighbour's value (a teacher's map is
    dense)."""
    from scipy import ndimage
    from skimage import data

    disparity = np.asarray(data.stereo_motorcycle()[2], dtype=np.float32)
    holes = ~np.isfinite(disparity)
    index = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
    return disparity[tuple(index)]


def _resize(array: np.ndarray, height: int, width: int, antialias: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=antialias)[0, 0].numpy()


@lru_cache(maxsize=64)
def teacher_map(height: int, width: int) -> np.ndarray:
    """The stand-in's output at the teacher's resolution for an image of height x width: the
    reference scene (turned upright for a portrait image) at Depth Anything's input size."""
    ref = reference_disparity()
    if (height > width) != (ref.shape[0] > ref.shape[1]):
        ref = ref.T
    th, tw = teacher_input_size(height, width, TEACHER_SHORT_SIDE, TEACHER_SHORT_SIDE, PATCH, True)
    return _resize(ref, th, tw, antialias=True)


@lru_cache(maxsize=16)
def image_map(height: int, width: int, label_h: int | None = None, label_w: int | None = None) -> np.ndarray:
    """teacher_map bilinearly at the image's size, as Depth Anything's post-processing restores
    it, or at the label's size (label_h x label_w) when one is given."""
    label_h, label_w = label_h or height, label_w or width
    small = teacher_map(height, width)
    return _resize(small, label_h, label_w, antialias=label_h < small.shape[0] or label_w < small.shape[1])


@lru_cache(maxsize=16)
def sky_mask(height: int, width: int) -> np.ndarray:
    """True above a wavy horizon ~SKY_TOP of the way down."""
    x = np.arange(width) / max(width, 1)
    horizon = height * (SKY_TOP + 0.04 * np.sin(9 * x) + 0.02 * np.sin(31 * x + 1))
    return np.arange(height)[:, None] < horizon[None, :]


@dataclass(eq=False)
class StandInTeacher:
    """Duck-types labelers.teacher.Teacher for the flow: ``rate`` images/s of device time."""

    rate: float = 300.0
    name: str = "stand-in"
    output: str = DISPARITY
    device: object = None        # None: the flow uploads nothing (there is no device to feed)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    device_seconds: float = 0.0

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return teacher_input_size(height, width, TEACHER_SHORT_SIDE, TEACHER_SHORT_SIDE, PATCH, True)

    def predict(self, images, sizes=None) -> list[Prediction]:
        """Sleep the device's time, then hand out each image's map at its label size (one copy:
        the host's share)."""
        seconds = len(images) / self.rate
        time.sleep(seconds)
        with self._lock:
            self.device_seconds += seconds
        sizes = sizes or [im.shape[:2] for im in images]
        return [Prediction(image_map(*im.shape[:2], *size).copy()) for im, size in zip(images, sizes)]


@dataclass(eq=False)
class StandInSky:
    """Duck-types labelers.sky.SkySegmenter: the horizon band at each image's size (no device
    time of its own: the teacher's ``rate`` is the whole model step's)."""

    name: str = "stand-in-sky"
    device: object = None
    input_size: tuple[int, int] = (640, 640)   # the default sky model's (SegFormer, ADE20k at 640)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return self.input_size

    def masks(self, images, sizes=None) -> list[np.ndarray]:
        return [sky_mask(*size).copy() for size in (sizes or [im.shape[:2] for im in images])]
