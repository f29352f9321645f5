"""What a teacher gives for one image: its raw map, and what some teachers add (a confidence map,
the camera's field of view). Every teacher, a transformers family or a plugin, returns these, so
the stages after the model see one shape of result whatever made it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's teacher output, at the image's own size (after EXIF orientation).

    raw: float32 HxW in the teacher's output kind (labelers.normalize.TEACHER_OUTPUTS).
    confidence: float32 HxW in [0, 1], 1 = most confident; None when the teacher gives none.
    fov_deg: the horizontal field of view the teacher predicts for the image, in degrees; None
    when it predicts none (the sample json's ``intrinsics`` gives the focal length from it).
    label: the label already made on the device (labelers.device_label.QuantizedLabel), raw then
    None: the float map never came to the host.
    """

    raw: np.ndarray | None
    confidence: np.ndarray | None = None
    fov_deg: float | None = None
    label: object | None = None


@dataclass(frozen=True, slots=True)
class NoLabel:
    """A model's output for one image that no label can be made from (NaN or inf where numbers
    should be: broken weights, an overflow). Stands in the image's place in a batch's results,
    so that the pipeline makes that sample an error row with ``reason`` and labels the rest."""

    reason: str


def non_finite(model: str, bad: int, total: int) -> NoLabel:
    return NoLabel(f"the {model}'s output holds {bad} non-finite values of {total} (NaN or inf): "
                   "broken weights or an overflow")


def checked(prediction, height: int, width: int, teacher: str) -> Prediction | NoLabel:
    """A teacher's result for an image of height x width, or a ValueError saying what is wrong
    with it: a map of another size would be stretched or cut silently further on. A bare array
    is a Prediction with the raw map alone."""
    if not isinstance(prediction, Prediction):
        prediction = Prediction(prediction)
    raw = np.asarray(prediction.raw)
    if raw.shape != (height, width) or raw.dtype.kind != "f":
        raise ValueError(f"teacher {teacher} returned a {raw.dtype} map of shape {raw.shape} for a "
                         f"{height}x{width} image; expected float HxW at the image's size")
    if bad := int(raw.size - np.count_nonzero(np.isfinite(raw))):
        return non_finite("teacher", bad, raw.size)
    confidence = prediction.confidence
    if confidence is not None:
        confidence = np.asarray(confidence)
        if confidence.shape != (height, width) or confidence.dtype.kind != "f":
            raise ValueError(f"teacher {teacher} returned a {confidence.dtype} confidence map of shape "
                             f"{confidence.shape} for a {height}x{width} image; expected float HxW in [0, 1]")
        finite = confidence[np.isfinite(confidence)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise ValueError(f"teacher {teacher} returned confidence in [{finite.min():.3g}, {finite.max():.3g}]; "
                             "expected [0, 1] (1 = most confident)")
        confidence = confidence.astype(np.float32, copy=False)
    fov = prediction.fov_deg
    if fov is not None:
        fov = float(fov)
        if not math.isfinite(fov):
            return NoLabel(f"the teacher predicted a field of view of {fov} degrees: broken weights or an overflow")
        if not 0 < fov < 180:
            raise ValueError(f"teacher {teacher} predicted a field of view of {fov} degrees; expected (0, 180)")
    return Prediction(raw.astype(np.float32, copy=False), confidence, fov)
