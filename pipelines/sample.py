"""The one record that crosses every labeling stage."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Sample:
    """One input sample on its way to a labeled sample or an error row.

    Stages fill it in order (decode -> label -> encode); a stage that fails sets
    ``error`` and later stages leave the sample alone, so every sample ends with an
    explicit outcome and none is dropped.
    """

    key: str
    source: str                                 # input shard URL
    image_ext: str | None = None                # extension of the image member, e.g. "jpg"
    image_bytes: bytes | None = None            # original bytes, written back unchanged
    extras: dict[str, bytes] = field(default_factory=dict)  # carried input members
    image: np.ndarray | None = None             # decoded RGB uint8 HxWx3, EXIF-oriented
    height: int | None = None                   # of the oriented image; kept after image is freed
    width: int | None = None
    raw: np.ndarray | None = None               # teacher output at the label's size (float32)
    label: object | None = None                 # or the label made on the device (device_label.QuantizedLabel)
    confidence: np.ndarray | None = None        # the teacher's confidence, float32 HxW in [0, 1], if it gives one
    fov_deg: float | None = None                # the field of view the teacher predicts, if it does
    sky: np.ndarray | None = None               # bool HxW, True = sky
    valid: np.ndarray | None = None             # bool HxW, ground truth only: True = label known
    ground_truth: str | None = None             # ground truth only: the member it came from
    error: str | None = None
    notes: list[str] = field(default_factory=list)   # what was dropped from an ok sample, and why
    held: int = 0                               # pixels reserved in the worker's budget (PixelBudget)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, reason: str) -> "Sample":
        self.error = reason
        self.image = self.raw = self.label = self.sky = self.valid = self.confidence = None
        return self
