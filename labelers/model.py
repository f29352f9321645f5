"""What the teacher and the sky segmenter share: a transformers model loaded for inference
(safetensors weights, fp32, on a resolved device, with a resolved precision) and its batched
forward pass. Each keeps only what it reads from the model's outputs, and how."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeVar

import numpy as np
import torch

from labelers.devices import autocast, resolve_device, resolve_dtype
from labelers.loading import load_pretrained
from labelers.preprocess import ImagePreprocess

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model and its processor as loading leaves them, with the device and precision resolved."""

    model: torch.nn.Module
    processor: Any
    device: torch.device
    dtype: torch.dtype


def load_for_inference(auto_model: str, source: str, *, device: str | torch.device, dtype: str,
                       revision: str | None) -> Loaded:
    """Load with transformers' ``auto_model`` class (its name, e.g. AutoModelForDepthEstimation,
    so that transformers is imported only here). Device and precision are resolved first: a bad
    flag fails before any weights are read."""
    dev = resolve_device(device)
    precision = resolve_dtype(dtype, dev)
    auto = getattr(import_module("transformers"), auto_model)
    model, processor = load_pretrained(auto, source, revision=revision, device=dev)
    return Loaded(model, processor, dev, precision)


@dataclass(frozen=True, slots=True, eq=False)
class InferenceModel:
    """A model ready to run on images: weights on a device, its preprocessing, its precision."""

    name: str
    preprocess: ImagePreprocess
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees for an image of this size."""
        return self.preprocess.target_size(height, width)

    def run(self, images: Sequence[np.ndarray], read: Callable[..., Iterable[T]],
            sizes: Sequence[tuple[int, int]] | None = None, per_image: Sequence | None = None) -> list[T]:
        """One result per image, in order: ``read(outputs, batch, sizes)`` gives the results of one
        forward pass, one per image of ``batch`` (the images it ran on), each at its ``sizes``
        entry (height, width: the label's size; the image's own when ``sizes`` is None).
        ``per_image``: one more thing per image, handed to ``read`` for the batch's images.

        Images that share a target size run in one forward pass; nothing is padded to a batch
        size, so an image's result does not depend on its batch-mates beyond float noise. The
        forward runs under autocast (half precision on CUDA), ``read`` after it, in fp32.
        """
        results: list = [None] * len(images)
        with torch.inference_mode():
            for members, pixels in self.preprocess.batches(images, self.device):
                with autocast(self.device, self.dtype):
                    outputs = self.model(pixel_values=pixels)
                batch = [images[i] for i in members]
                out = [tuple(sizes[i]) if sizes else tuple(images[i].shape[:2]) for i in members]
                more = () if per_image is None else ([per_image[i] for i in members],)
                for i, result in zip(members, read(outputs, batch, out, *more), strict=True):
                    results[i] = result
        return results
