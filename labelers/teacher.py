"""The depth teacher: raw relative disparity for a batch of images (SPEC §5.1-5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelers.devices import autocast
from labelers.loading import load_for_inference
from labelers.preprocess import ImagePreprocess


@dataclass(frozen=True, slots=True)
class TeacherPreprocess(ImagePreprocess):
    """The teacher's processor settings; sizes follow the official lower-bound rule."""


@dataclass(frozen=True, slots=True, eq=False)
class Teacher:
    """A depth model ready to label: weights on a device, its preprocessing, its precision."""

    name: str
    preprocess: TeacherPreprocess
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        revision: str | None = None,
        name: str | None = None,
    ) -> "Teacher":
        """Load from a save_pretrained folder or a hub id (the HF cache serves it offline)."""
        from transformers import AutoModelForDepthEstimation

        model, processor, dev, precision = load_for_inference(
            AutoModelForDepthEstimation, source, device=device, dtype=dtype, revision=revision
        )
        preprocess = TeacherPreprocess.from_processor(processor)
        return cls(name or str(source), preprocess, dev, precision, model)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the teacher sees for an image of this size."""
        return self.preprocess.target_size(height, width)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Raw disparity (float32 HxW, each image's own size) for uint8 HxWx3 RGB images.

        Images that share a target size run in one forward pass; nothing is padded, so an
        image's result does not depend on its batch-mates beyond float noise.
        """
        results: list[np.ndarray | None] = [None] * len(images)
        with torch.inference_mode():
            for members, pixels in self.preprocess.batches(images, self.device):
                with autocast(self.device, self.dtype):
                    depth = self.model(pixel_values=pixels).predicted_depth
                depth = depth.float()
                for row, i in enumerate(members):
                    height, width = images[i].shape[:2]
                    full = F.interpolate(
                        depth[row][None, None], size=(height, width), mode="bilinear", align_corners=False
                    )
                    results[i] = full[0, 0].cpu().numpy().astype(np.float32, copy=False)
        return results  # type: ignore[return-value]
