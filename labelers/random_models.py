"""Random-weight teacher and sky models: the real architectures, saved like hub checkpoints.

For demos, tests and benchmarks on machines without downloaded weights. They exercise every
step of labeling (loading, preprocessing, batching, post-processing, storage) at the real cost
of the chosen size, but their outputs carry NO depth or sky quality: a label made with them
shows the machinery, not the scene.

Two deliberate departures from a plain random init, so that demo labels are not blank:
- teacher: the DPT neck and head convolutions get PyTorch-style Kaiming init. With the 0.02-std
  init of transformers the output shrinks to ~1e-6 across the decoder (and underflows in fp16);
  with Kaiming it is O(1-100) and varies with the image.
- segmenter: the sky logit is wired to a colour rule, so masks are neither empty nor full on
  photos. The first patch embedding computes f = 2 (B - R) + (luma - 0.6) / 2 (pixel values in
  0..1, averaged over the patch); the decode head passes it to the 'sky' class only. A pixel is
  "sky" where it is bluish or bright (f > 0) — blue or overcast skies, and blue shirts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, slots=True)
class TeacherSpec:
    """One Depth Anything size: DINOv2 encoder and DPT decoder widths."""

    hidden: int
    layers: int
    heads: int
    mlp_ratio: int
    out: tuple[int, ...]  # encoder layers the decoder reads
    neck: tuple[int, int, int, int]
    fusion: int
    head: int = 32  # the official DPT head keeps 32 channels at every size


# Depth Anything V2 sizes (V1 reads the last four layers instead); "tiny" is for fast tests.
TEACHER_SIZES = {
    "tiny": TeacherSpec(32, 4, 2, 2, (1, 2, 3, 4), (16, 32, 32, 32), 16, head=8),
    "vits": TeacherSpec(384, 12, 6, 4, (3, 6, 9, 12), (48, 96, 192, 384), 64),
    "vitb": TeacherSpec(768, 12, 12, 4, (3, 6, 9, 12), (96, 192, 384, 768), 128),
    "vitl": TeacherSpec(1024, 24, 16, 4, (5, 12, 18, 24), (256, 512, 1024, 1024), 256),
}

SEGMENTER_SIZES = {
    "tiny": dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]),
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8]),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], num_attention_heads=[1, 2, 5, 8]),
}
SEGMENTER_DECODER = {"tiny": 16, "b0": 256, "b5": 768}
SEGMENTER_CLASSES = {"tiny": 6, "b0": 150, "b5": 150}
# The first ADE20K class names (index 2 is 'sky'); the rest are named class_<i>.
ADE20K_HEAD = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
)
SKY_ID = 2


def _choose(table: dict, size: str, what: str):
    if size not in table:
        raise ValueError(f"unknown {what} size {size!r}; choose one of {sorted(table)}")
    return table[size]


def teacher_config(size: str = "tiny", image_size: int = 518):
    """The DepthAnythingConfig of a Depth Anything (V2) size: tiny, vits, vitb or vitl."""
    from transformers import DepthAnythingConfig, Dinov2Config

    spec = _choose(TEACHER_SIZES, size, "teacher")
    backbone = Dinov2Config(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        patch_size=14,
        image_size=image_size,
        out_features=[f"stage{i}" for i in spec.out],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=spec.hidden,
        neck_hidden_sizes=list(spec.neck),
        fusion_hidden_size=spec.fusion,
        head_hidden_size=spec.head,
        depth_estimation_type="relative",
    )


def save_random_teacher(directory, *, size: str = "tiny", image_size: int = 518, seed: int = 0) -> Path:
    """Save a random DepthAnythingForDepthEstimation with Depth Anything's processor settings."""
    from transformers import DepthAnythingForDepthEstimation, DPTImageProcessor

    config = teacher_config(size, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config).eval()
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    processor = DPTImageProcessor(
        size={"height": image_size, "width": image_size},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,  # bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=False,
    )
    return _save(directory, model, processor)


def save_random_segmenter(
    directory, *, size: str = "tiny", image_size: int = 512, seed: int = 0, sky: bool = True
) -> Path:
    """Save a random SegformerForSemanticSegmentation whose 'sky' logit follows a colour rule.

    sky=False names no class 'sky' (a model the engine must refuse).
    """
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    spec = _choose(SEGMENTER_SIZES, size, "segmenter")
    count = SEGMENTER_CLASSES[size]
    names = [ADE20K_HEAD[i] if i < len(ADE20K_HEAD) else f"class_{i}" for i in range(count)]
    if not sky:
        names[SKY_ID] = f"class_{SKY_ID}"
    config = SegformerConfig(
        num_labels=count,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        decoder_hidden_size=SEGMENTER_DECODER[size],
        **spec,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegformerForSemanticSegmentation(config).eval()
    _wire_sky_logit(model, IMAGENET_MEAN, IMAGENET_STD)
    processor = SegformerImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_reduce_labels=False,
    )
    return _save(directory, model, processor)


@torch.no_grad()
def _wire_sky_logit(model, mean, std, gain: float = 50.0) -> None:
    """Route f = 2 (B - R) + (luma - 0.6) / 2 from the pixels to the 'sky' logit (see module doc).

    Channels 0 and 1 of the first patch embedding carry +gain*f and -gain*f; its LayerNorm turns
    them into about +-sign(f), which the residual blocks keep. The decode head copies that value
    to fused channels 0 (relu(s)) and 1 (relu(-s)), and only the sky class reads those two.
    """
    embed = next(m for m in model.segformer.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    head = model.decode_head
    projections = getattr(head, "linear_projections", None) or head.linear_c
    stage0 = projections[0].proj

    colour = torch.tensor([-2.0, 0.0, 2.0]) + 0.5 / 3  # 2 (B - R) + luma / 2
    offset = -0.3  # -0.6 / 2
    weight = colour * torch.tensor(std)  # the model sees (p - mean) / std
    bias = float((colour * torch.tensor(mean)).sum()) + offset
    taps = embed.weight.shape[2] * embed.weight.shape[3]
    for channel, sign in ((0, 1.0), (1, -1.0)):
        embed.weight[channel] = sign * gain * weight.view(3, 1, 1) / taps
        embed.bias[channel] = sign * gain * bias

    stage0.weight.zero_()
    stage0.bias.zero_()
    stage0.weight[0, 0], stage0.weight[0, 1] = 1.0, -1.0  # s = ch0 - ch1 of stage 1
    # linear_fuse sees the stages in reverse order, so stage 1 is the last block of channels.
    first_stage = (len(projections) - 1) * stage0.out_features
    head.linear_fuse.weight[:, first_stage] = 0.0
    head.linear_fuse.weight[0, :, 0, 0] = 0.0
    head.linear_fuse.weight[1, :, 0, 0] = 0.0
    head.linear_fuse.weight[0, first_stage, 0, 0] = 1.0
    head.linear_fuse.weight[1, first_stage, 0, 0] = -1.0
    head.classifier.weight[:, :2] = 0.0
    head.classifier.weight[SKY_ID] = 0.0
    head.classifier.weight[SKY_ID, 0, 0, 0] = 2.0
    head.classifier.weight[SKY_ID, 1, 0, 0] = -2.0
    head.classifier.bias.zero_()


def _save(directory, model, processor) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # safetensors
    processor.save_pretrained(path)
    return path
