"""The depth teacher: its raw output (relative disparity, or metric depth) for a batch of images
(SPEC §5.1-5.2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelers.devices import autocast
from labelers.loading import load_for_inference
from labelers.normalize import DISPARITY
from labelers.preprocess import ImagePreprocess, family_of_processor

# How each family's post_process_depth_estimation brings the output back to the image size.
# Depth Anything keeps the official code's bilinear resize (SPEC §5.4), not its processor's bicubic.
UPSAMPLE = {"depth_anything": "bilinear", "dpt": "bicubic", "glpn": "bicubic", "zoedepth": "bicubic"}


@dataclass(frozen=True, slots=True)
class TeacherPreprocess(ImagePreprocess):
    """The teacher's processor settings and its family (config.model_type): Depth Anything
    follows the official lower-bound rule, the other families their own processors."""

    family: str = "depth_anything"

    @classmethod
    def from_processor(cls, processor, family: str | None = None) -> "TeacherPreprocess":
        family = family or family_of_processor(processor) or "depth_anything"
        spec = ImagePreprocess.from_processor.__func__(cls, processor, family)
        return dataclasses.replace(spec, family=family)

    def restore(self, depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One output map (h x w) back at the image's size, as the family's post-processing does:
        ZoeDepth resizes to the padded image and cuts the padding off; the others just resize."""
        pad_h, pad_w = self.padding(height, width)
        full = F.interpolate(
            depth[None, None], size=(height + 2 * pad_h, width + 2 * pad_w), mode=UPSAMPLE[self.family],
            align_corners=False,
        )
        return full[0, 0, pad_h : pad_h + height, pad_w : pad_w + width]


@dataclass(frozen=True, slots=True, eq=False)
class Teacher:
    """A depth model ready to label: weights on a device, its preprocessing, its precision."""

    name: str
    preprocess: TeacherPreprocess
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    output: str = DISPARITY  # what predicted_depth holds: DISPARITY or DEPTH (normalize.to_disparity)

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        revision: str | None = None,
        name: str | None = None,
        output: str = DISPARITY,
    ) -> "Teacher":
        """Load from a save_pretrained folder or a hub id (the HF cache serves it offline)."""
        from transformers import AutoModelForDepthEstimation

        model, processor, dev, precision = load_for_inference(
            AutoModelForDepthEstimation, source, device=device, dtype=dtype, revision=revision
        )
        preprocess = TeacherPreprocess.from_processor(processor, family=model.config.model_type)
        return cls(name or str(source), preprocess, dev, precision, model, output=output)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the teacher sees for an image of this size."""
        return self.preprocess.target_size(height, width)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's own output (float32 HxW, each image's own size; ``output`` says whether
        disparity or depth) for uint8 HxWx3 RGB images.

        Images that share a target size run in one forward pass; nothing is padded to a batch
        size (ZoeDepth's reflect padding is the image's own), so an image's result does not
        depend on its batch-mates beyond float noise.
        """
        results: list[np.ndarray | None] = [None] * len(images)
        with torch.inference_mode():
            for members, pixels in self.preprocess.batches(images, self.device):
                with autocast(self.device, self.dtype):
                    depth = self.model(pixel_values=pixels).predicted_depth
                depth = depth.float()
                for row, i in enumerate(members):
                    height, width = images[i].shape[:2]
                    full = self.preprocess.restore(depth[row], height, width)
                    results[i] = full.cpu().numpy().astype(np.float32, copy=False)
        return results  # type: ignore[return-value]
