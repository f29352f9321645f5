"""Sky masks from a semantic segmentation model (SPEC §5.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelers.model import InferenceModel, load_for_inference
from labelers.prediction import NoLabel, non_finite
from labelers.preprocess import ImagePreprocess

# Upsampled logits held at once, in elements (~64 MiB of float32): bounds memory on huge images.
UPSAMPLE_BUDGET = 16 * 1024 * 1024


class NoSkyClassError(ValueError):
    """The segmentation model has no class named 'sky', so it cannot give sky masks."""


def sky_class_ids(id2label: Mapping) -> tuple[int, ...]:
    """Every class id whose label is 'sky', ignoring case and surrounding spaces."""
    return tuple(sorted(int(i) for i, label in id2label.items() if str(label).strip().lower() == "sky"))


def sky_from_logits(logits: torch.Tensor, sky_ids: Sequence[int], size: tuple[int, int],
                    per_class: bool | None = None) -> torch.Tensor:
    """bool mask at `size`: argmax of the bilinearly upsampled logits (CxHxW) is a sky class.

    Equal to post_process_semantic_segmentation(...) in sky_ids, without C full-size maps in
    memory: classes are upsampled a few at a time (UPSAMPLE_BUDGET) and folded into a running
    best score and whether it belongs to sky. Classes run in index order and a later one wins
    only when strictly larger, so ties resolve like argmax (lowest id).

    The fold differs by device, for speed only. On CUDA, one argmax per chunk (few kernel
    launches). On CPU, argmax over the class axis is a strided reduction that took 80 % of the
    sky model's time in a profile, so each class map is folded in with three elementwise ops.
    ``per_class`` forces one fold (tests hold the two equal).
    """
    num_classes = logits.shape[0]
    chunk = max(1, min(num_classes, UPSAMPLE_BUDGET // max(1, size[0] * size[1])))
    if per_class is None:
        per_class = logits.device.type != "cuda"
    fold = _fold_each_class if per_class else _fold_chunk_argmax
    state = None
    for start in range(0, num_classes, chunk):
        part = F.interpolate(logits[None, start : start + chunk], size=size, mode="bilinear", align_corners=False)[0]
        state = fold(part, start, frozenset(sky_ids), state)
    return state[1]


def _fold_each_class(part, start, sky_ids, state):
    best, sky = state if state else (None, None)
    for j in range(part.shape[0]):
        value, is_sky = part[j], (start + j) in sky_ids
        if best is None:
            best, sky = value.clone(), torch.full(value.shape, is_sky, dtype=torch.bool, device=value.device)
            continue
        wins = value > best
        torch.maximum(best, value, out=best)
        if is_sky:
            sky |= wins
        else:
            sky &= ~wins
    return best, sky


def _fold_chunk_argmax(part, start, sky_ids, state):
    is_sky_class = torch.tensor([start + j in sky_ids for j in range(part.shape[0])], device=part.device)
    index = part.argmax(dim=0)  # first maximum within the chunk, as argmax over all
    value = part.gather(0, index[None])[0]
    part_sky = is_sky_class[index]
    if state is None:
        return value, part_sky
    best, sky = state
    wins = value > best
    return torch.where(wins, value, best), torch.where(wins, part_sky, sky)


@dataclass(frozen=True, slots=True, eq=False)
class SkySegmenter(InferenceModel):
    """A segmentation model reduced to one question per pixel: is it sky?"""

    sky_ids: tuple[int, ...]

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        revision: str | None = None,
        name: str | None = None,
    ) -> "SkySegmenter":
        """Load a model and its processor; refuse at once a model without a sky class."""
        loaded = load_for_inference("AutoModelForSemanticSegmentation", source, device=device, dtype=dtype,
                                    revision=revision)
        id2label = loaded.model.config.id2label
        sky_ids = sky_class_ids(id2label)
        label = name or str(source)
        if not sky_ids:
            raise NoSkyClassError(
                f"sky model {label!r}: its id2label has no class named 'sky' "
                f"({len(id2label)} classes); use a model with a sky class, or --sky none"
            )
        preprocess = ImagePreprocess.from_processor(loaded.processor)
        return cls(label, preprocess, loaded.device, loaded.dtype, loaded.model, sky_ids=sky_ids)

    def masks(self, images: Sequence[np.ndarray],
              sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray | NoLabel]:
        """bool HxW per uint8 HxWx3 RGB image, True = sky; at ``sizes`` (the labels') if given.
        An image whose logits hold NaN or inf gets a NoLabel: argmax would call it sky-free."""
        return self.run(images, self._fold, sizes)

    def _fold(self, outputs, batch: list, sizes: list) -> list[np.ndarray | NoLabel]:
        logits = outputs.logits.float()
        if max(self.sky_ids) >= logits.shape[1]:
            raise ValueError(f"sky model {self.name}: its id2label names sky class {max(self.sky_ids)}, "
                             f"but it outputs {logits.shape[1]} classes")
        bad = (~torch.isfinite(logits)).flatten(1).sum(1).tolist()   # one sync per batch
        return [non_finite("sky model", int(bad[row]), logits[row].numel()) if bad[row]
                else sky_from_logits(logits[row], self.sky_ids, size).cpu().numpy() for row, size in enumerate(sizes)]
