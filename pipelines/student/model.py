"""The student's model: the paper's construction from a DINOv2 encoder, and the encoder features
that feature alignment compares.

Depth Anything's student is not a fine-tuned teacher: its encoder starts from DINOv2 and its DPT
head from scratch, with the head sizes of the paper's S/B/L/G configurations. ``from_dinov2``
builds exactly that from a ``save_pretrained`` ``Dinov2Model``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# DINOv2 (and Depth Anything) see ImageNet-normalized RGB; the loader yields [0, 1].
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Head:
    """A DPT head's sizes (DepthAnythingConfig): which encoder layers it reads (0-based), their
    reassembled widths, and the fusion width."""

    layers: tuple[int, int, int, int]
    neck: tuple[int, int, int, int]
    fusion: int


# The official Depth Anything (V1/V2) configurations, by DINOv2 width: ViT-S, B, L, G.
PAPER_HEADS = {
    384: Head((2, 5, 8, 11), (48, 96, 192, 384), 64),
    768: Head((2, 5, 8, 11), (96, 192, 384, 768), 128),
    1024: Head((4, 11, 17, 23), (256, 512, 1024, 1024), 256),
    1536: Head((9, 19, 29, 39), (1536, 1536, 1536, 1536), 384),
}


def head_for(width: int, layers: int) -> Head:
    """The paper's head for a DINOv2 of this width; for another (a reduced test encoder) the S/B
    pattern scaled: four evenly spaced layers ending with the last, widths w/8, w/4, w/2, w,
    fusion w/6 (at least 8)."""
    if width in PAPER_HEADS and max(PAPER_HEADS[width].layers) < layers:
        return PAPER_HEADS[width]
    if layers < 4:
        raise ValueError(f"a DPT head reads four encoder layers; this DINOv2 has {layers}")
    picked = tuple(round(layers * k / 4) - 1 for k in range(1, 5))
    return Head(picked, tuple(max(1, width // d) for d in (8, 4, 2, 1)), max(8, width // 6))


def from_dinov2(directory: str | Path, *, seed: int = 0):
    """A DepthAnythingForDepthEstimation whose encoder is the Dinov2Model saved in ``directory``
    (weights copied exactly) and whose DPT head is freshly initialised (``seed``)."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        Dinov2Model,
    )

    encoder = Dinov2Model.from_pretrained(directory, use_safetensors=True)
    if encoder.config.model_type != "dinov2":
        raise ValueError(f"{directory} holds a {encoder.config.model_type!r} model; --init dinov2 needs a Dinov2Model")
    width, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers
    head = head_for(width, layers)
    backbone = Dinov2Config(**{**encoder.config.to_dict(), "out_features": [f"stage{i + 1}" for i in head.layers],
                               "out_indices": None, "reshape_hidden_states": False, "apply_layernorm": True})
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=encoder.config.patch_size,
                                 reassemble_hidden_size=width, neck_hidden_sizes=list(head.neck),
                                 fusion_hidden_size=head.fusion, depth_estimation_type="relative")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = DepthAnythingForDepthEstimation(config)
    missing, unexpected = student.backbone.load_state_dict(encoder.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: the DINOv2 weights do not fit the student's encoder "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model   # DistributedDataParallel


def patch_tokens(config, tokens: Tensor) -> Tensor:
    """(B, N, C) tokens without the CLS token and any register tokens."""
    return tokens[:, 1 + int(getattr(config, "num_register_tokens", 0) or 0):]


def student_features(student: nn.Module, hidden_states: tuple[Tensor, ...]) -> Tensor:
    """The student's encoder output as the frozen Dinov2Model gives its own: the last layer
    after the encoder's final LayerNorm, patch tokens only. ``hidden_states[-1]`` alone is the
    last layer *before* that norm: compared with a frozen ``last_hidden_state`` it scores a copy
    of the frozen encoder as misaligned, and the loss pulls the student away from DINOv2."""
    backbone = _unwrap(student).backbone
    return patch_tokens(backbone.config, backbone.layernorm(hidden_states[-1]))


def frozen_features(frozen: nn.Module, pixel_values: Tensor) -> Tensor:
    """The frozen DINOv2's patch tokens (its last_hidden_state, normed), without gradient."""
    with torch.no_grad():
        return patch_tokens(frozen.config, frozen(pixel_values=pixel_values).last_hidden_state)
