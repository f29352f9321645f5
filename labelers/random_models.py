"""Random-weight teacher and sky models: the real architectures, saved like hub checkpoints.

For demos, tests and benchmarks on machines without downloaded weights: Depth Anything and
SegFormer at their real sizes, the other depth families at a modest one (save_random_family).
They exercise every step of labeling (loading, preprocessing, batching, post-processing,
storage) at the real cost of the chosen size, but their outputs carry NO depth or sky quality:
a label made with them shows the machinery, not the scene.

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

import json
import math
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
        init_decoder([*model.neck.modules(), *model.head.modules()])
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
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

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


# ---- The other transformers depth families, for `bench --teachers` ---------------------------


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """One scale of the other families: a ViT backbone (BEiT for DPT and ZoeDepth, DINOv2 for
    Depth Pro), the DPT-style decoder widths, the processor's input size, and GLPN's encoder."""

    hidden: int
    layers: int
    heads: int
    neck: tuple[int, int, int, int]
    fusion: int
    image_size: int  # DPT's processor size; ZoeDepth's is image_size x 4/3 image_size
    depth_pro_patch: int  # Depth Pro's patch encoders' input; its processor size is 4x (scales 1/4, 1/2, 1)
    glpn_hidden: tuple[int, int, int, int]
    glpn_depths: tuple[int, int, int, int]
    glpn_heads: tuple[int, int, int, int]


# "small": 8-layer ViTs a quarter of ViT-B's width at DPT's and ZoeDepth's real input sizes, and
# GLPN's default (MiT-b0) encoder: the real layers, at a size a CPU times in seconds. "tiny": tests.
FAMILY_SCALES = {
    "tiny": FamilySpec(32, 4, 2, (8, 16, 16, 16), 16, 128, 64, (8, 16, 16, 16), (1, 1, 1, 1), (1, 1, 1, 1)),
    "small": FamilySpec(192, 8, 3, (48, 96, 192, 192), 64, 384, 128, (32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8)),
}


def init_decoder(modules) -> None:
    """Kaiming-initialise a random depth decoder's convolutions: with the default init the random
    decoders give a near-constant map."""
    for module in modules:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _beit(spec: FamilySpec):
    from transformers import BeitConfig

    stages = [spec.layers * k // 4 for k in range(1, 5)]
    return BeitConfig(
        hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        intermediate_size=4 * spec.hidden, image_size=spec.image_size, patch_size=16,
        out_features=[f"stage{i}" for i in stages], use_relative_position_bias=True, reshape_hidden_states=False,
    )


def _dpt(spec: FamilySpec):
    """Intel/dpt-beit's layout: DPT on a BEiT backbone, aspect kept, sides multiples of 32."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    config = DPTConfig(backbone_config=_beit(spec), neck_hidden_sizes=list(spec.neck), fusion_hidden_size=spec.fusion,
                       reassemble_hidden_size=spec.hidden, is_hybrid=False)
    model = DPTForDepthEstimation(config)
    init_decoder([*model.neck.modules(), *model.head.modules()])
    processor = DPTImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, keep_aspect_ratio=True, ensure_multiple_of=32,
        resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return model, processor, f"BEiT {spec.layers}x{spec.hidden} at {spec.image_size}, neck {_dashed(spec.neck)}"


def _glpn(spec: FamilySpec):
    """vinvino02/glpn-kitti's layout (MiT encoder): the image at its own size, sides floored to 32."""
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessorPil

    config = GLPNConfig(hidden_sizes=list(spec.glpn_hidden), depths=list(spec.glpn_depths),
                        num_attention_heads=list(spec.glpn_heads), decoder_hidden_size=spec.fusion)
    model = GLPNForDepthEstimation(config)
    return model, GLPNImageProcessorPil(), f"MiT {_dashed(spec.glpn_hidden)}, depths {_dashed(spec.glpn_depths)}"


def _zoedepth(spec: FamilySpec):
    """Intel/zoedepth-nyu's layout: DPT on BEiT with the metric-bins head; reflect padding."""
    from transformers import (
        ZoeDepthConfig,
        ZoeDepthForDepthEstimation,
        ZoeDepthImageProcessorPil,
    )

    config = ZoeDepthConfig(
        backbone_config=_beit(spec), neck_hidden_sizes=list(spec.neck), fusion_hidden_size=spec.fusion,
        reassemble_hidden_size=spec.hidden, num_relative_features=spec.fusion // 2, bottleneck_features=spec.fusion,
        bin_embedding_dim=spec.fusion,
        bin_configurations=[{"n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0, "name": "nyu"}],
        patch_transformer_hidden_size=spec.fusion, patch_transformer_intermediate_size=2 * spec.fusion,
        patch_transformer_num_attention_heads=2,
    )
    model = ZoeDepthForDepthEstimation(config)
    init_decoder([m for name, m in model.named_modules() if not name.startswith("backbone")])
    size = {"height": spec.image_size, "width": spec.image_size * 4 // 3}
    return model, ZoeDepthImageProcessorPil(size=size, ensure_multiple_of=32), (
        f"BEiT {spec.layers}x{spec.hidden} at {size['height']}x{size['width']}, metric bins 64")


def _depth_pro(spec: FamilySpec):
    """apple/DepthPro-hf's layout (its 1536 and patches of 384 scaled down): DINOv2 image, patch
    and fov encoders; the processor (which needs torchvision) is saved as its preprocessor_config.json."""
    from transformers import DepthProConfig, DepthProForDepthEstimation

    patch = spec.depth_pro_patch
    dinov2 = {"model_type": "dinov2", "hidden_size": spec.hidden, "num_attention_heads": spec.heads,
              "num_hidden_layers": spec.layers, "image_size": patch, "patch_size": 16, "mlp_ratio": 4,
              "out_features": [f"stage{spec.layers}"], "out_indices": [spec.layers]}
    config = DepthProConfig(
        patch_size=patch, fusion_hidden_size=spec.fusion, intermediate_hook_ids=[spec.layers - 1, spec.layers // 2 - 1],
        intermediate_feature_dims=[spec.fusion] * 2, scaled_images_feature_dims=[2 * spec.fusion] * 2 + [spec.fusion],
        use_fov_model=True, image_model_config=dinov2, patch_model_config=dinov2, fov_model_config=dinov2,
    )
    model = DepthProForDepthEstimation(config).eval()
    init_decoder([*model.fusion_stage.modules(), *model.head.modules(), *model.fov_model.head.modules()])
    side = 4 * patch
    calibrate_depth_pro(model, torch.rand(1, 3, side, side) * 2 - 1)
    processor = {"image_processor_type": "DepthProImageProcessorFast", "do_resize": True,
                 "size": {"height": side, "width": side}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return model, processor, f"DINOv2 {spec.layers}x{spec.hidden} x3 (patches of {patch}) at {side}, fov on"


@torch.no_grad()
def calibrate_depth_pro(model, pixels: torch.Tensor) -> None:
    """Shift the last convolutions so that, on ``pixels`` (the model's input), the canonical inverse
    depth is about 0.6 +- 0.12 (not cut to 0 by the final ReLU, so the map varies) and the field of
    view about 60 degrees (a usable focal length): random weights give neither."""
    last, fov_last = model.head.layers[4], model.fov_model.head.layers[-1]
    seen = {}
    hook = last.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    fov = model(pixel_values=pixels).field_of_view
    hook.remove()
    gain = 0.12 / float(seen["x"].std())
    last.weight.mul_(gain)
    last.bias.mul_(gain).add_(0.6 - float(seen["x"].mean()) * gain)
    fov_last.weight.mul_(5)
    fov_last.bias.mul_(5).add_(60 - 5 * float(fov.mean()))


def _dashed(values) -> str:
    return "-".join(str(v) for v in values)


FAMILY_BUILDERS = {"dpt": _dpt, "glpn": _glpn, "zoedepth": _zoedepth, "depth_pro": _depth_pro}
# Depth Anything at each scale: save_random_teacher's (size, image_size).
DEPTH_ANYTHING_SCALES = {"tiny": ("tiny", 56), "small": ("vits", 266)}


def save_random_family(directory, family: str, *, scale: str = "small", seed: int = 0) -> tuple[Path, str]:
    """Save a random depth model of ``family`` (depth_anything, dpt, glpn, zoedepth, depth_pro)
    at ``scale`` (FAMILY_SCALES) with its processor settings; (folder, its config in one line)."""
    if family == "depth_anything":
        size, image_size = _choose(DEPTH_ANYTHING_SCALES, scale, "family")
        path = save_random_teacher(directory, size=size, image_size=image_size, seed=seed)
        desc = f"DINOv2 {TEACHER_SIZES[size].layers}x{TEACHER_SIZES[size].hidden} ({size}) at {image_size}"
        return path, f"{desc}; {_millions(path)}M params"
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"no random model of depth family {family!r}; choose one of depth_anything, "
                         f"{', '.join(FAMILY_BUILDERS)}")
    spec, build = _choose(FAMILY_SCALES, scale, "family"), FAMILY_BUILDERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor, desc = build(spec)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if isinstance(processor, dict):  # Depth Pro's processor class cannot be built without torchvision
        (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    else:
        processor.save_pretrained(path)
    return path, f"{desc}; {_millions(path)}M params"


def _millions(path: Path) -> float:
    """Parameters in the saved weights, in millions (one decimal)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return round(count / 1e6, 1)
