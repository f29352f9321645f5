"""A model's image preprocessing, read from its own processor config and run in torch.

The processors resize with PIL one image at a time on the CPU. Here the same steps run as tensor
ops on the model's device: resize as PIL does (antialiased kernels, two passes through uint8;
nearest with PIL's exact sampling), rescale, normalize. Sizes come from geometry.input_size under
the spec's `rule`: the official Depth Anything rule for Depth Anything (and, as before, for any
processor whose family is not given), and each other depth family's own rule (see `FAMILIES`).
ZoeDepth is the one family whose padding reaches the model (reflect padding, which its
post-processing removes); DPT-style zero padding that would reach the model is refused.

Depth Pro's processor needs torchvision, which the engine does without: its saved settings are
read into DepthProSettings, and its steps (a float resize without antialiasing to a fixed size,
float_resize) run here like the others'.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from labelers.geometry import FAMILIES, RULES, input_size, zoedepth_padding

# PIL resample codes (PILImageResampling) the engine reproduces; the others have no torch twin.
RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}

PADS = ("none", "zoedepth")  # zoedepth: reflect, int(sqrt(side / 2) * 3) on each side
# align-corners: float torch interpolate, as ZoeDepth does; float: float_resize, as Depth Pro does
RESIZE_MODES = ("pil", "align-corners", "float")


def float_resize(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """torchvision's resize of a float NCHW tensor without antialiasing, as transformers'
    torchvision processors run it (Depth Pro's input and its post-processing): F.interpolate with
    align_corners False; PIL's nearest code maps to torchvision's NEAREST_EXACT."""
    if resample == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest-exact")
    return F.interpolate(x, size=tuple(size), mode=resample, align_corners=False, antialias=False)


@dataclass(frozen=True, slots=True)
class DepthProSettings:
    """DepthProImageProcessor's settings, as its preprocessor_config.json saves them; the defaults
    are the class's. The class needs torchvision and cannot be built here, so the engine reads
    this instead; ImagePreprocess.from_processor reads it like a loaded processor."""

    size: Mapping = field(default_factory=lambda: {"height": 1536, "width": 1536})
    resample: int = 2  # PILImageResampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, saved: Mapping) -> "DepthProSettings":
        """The settings of a saved preprocessor_config.json; keys it lacks keep the defaults. One
        that names another processor class is refused: its steps would be another's."""
        kind = str(saved.get("image_processor_type") or "DepthProImageProcessor")
        if kind.removesuffix("Fast") != "DepthProImageProcessor":
            raise ValueError(f"a depth_pro model's preprocessor_config.json names {kind}; "
                             "expected DepthProImageProcessor")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if saved.get(f.name) is not None})


def _size_hw(size) -> tuple[int, int]:
    get = size.get if isinstance(size, Mapping) else lambda k: getattr(size, k, None)
    height, width = get("height"), get("width")
    if not height or not width:
        raise ValueError(f"the image processor's size must give height and width, got {size}")
    return int(height), int(width)


def _triple(values) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected one value per RGB channel, got {values}")
    return values  # type: ignore[return-value]


def family_of_processor(processor) -> str | None:
    """The depth family a processor class alone names (GLPN, ZoeDepth, Depth Pro); None when it is shared
    (DPTImageProcessor serves both DPT and Depth Anything) or not a depth processor."""
    name = type(processor).__name__
    for prefix, family in (("GLPN", "glpn"), ("ZoeDepth", "zoedepth"), ("DepthPro", "depth_pro")):
        if name.startswith(prefix):
            return family
    return None


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """numpy's 'reflect' padding as an index (any pad, also one longer than the side)."""
    return torch.from_numpy(np.pad(np.arange(n), pad, mode="reflect")).to(device)


def _centres(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """Source index of each output pixel centre for a nearest resize, summed up as PIL does."""
    scale = src / dst
    steps = np.full(dst, scale, dtype=np.float64)
    steps[0] = scale * 0.5
    index = np.cumsum(steps).astype(np.int64)  # sequential float64 sums, then truncation
    return torch.from_numpy(np.minimum(index, src - 1)).to(device)


def check_image(image: np.ndarray | torch.Tensor) -> None:
    """The labelers take decoded RGB: uint8 HxWx3, a numpy array or a tensor already on the
    model's device (labelers.devices.upload)."""
    is_array = isinstance(image, (np.ndarray, torch.Tensor))
    is_rgb = is_array and image.ndim == 3 and image.shape[2] == 3
    if not is_rgb or image.dtype not in (np.uint8, torch.uint8):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got shape {shape} dtype {dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")


@dataclass(frozen=True, slots=True)
class ImagePreprocess:
    """What a model's processor does to an image before the forward pass."""

    size_h: int  # divisor-floor: the size divisor (the smallest side it takes)
    size_w: int
    multiple: int | float  # ZoeDepth's processor default is 1/32
    keep_aspect: bool
    resample: str  # 'bicubic' | 'bilinear' | 'nearest'
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    rule: str = ""  # geometry.RULES; "" = lower-bound when keep_aspect, else fixed (the old default)
    pad: str = "none"  # PADS
    resize_mode: str = "pil"  # RESIZE_MODES

    def __post_init__(self) -> None:
        if self.size_h < 1 or self.size_w < 1 or not self.multiple > 0:
            raise ValueError(f"bad sizes: {self.size_h}x{self.size_w}, multiple {self.multiple}")
        if self.resample not in RESAMPLE_NAMES.values():
            raise ValueError(f"resample must be nearest, bilinear or bicubic, got {self.resample!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if not self.rule:
            object.__setattr__(self, "rule", "lower-bound" if self.keep_aspect else "fixed")
        if self.rule not in RULES or self.pad not in PADS or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown rule {self.rule!r}, pad {self.pad!r} or resize mode {self.resize_mode!r}")
        if self.resize_mode == "align-corners" and self.resample == "nearest":
            raise ValueError("the align-corners resize is bilinear or bicubic")

    @classmethod
    def from_processor(cls, processor, family: str | None = None) -> "ImagePreprocess":
        """Read the settings from a loaded image processor (AutoImageProcessor) or DepthProSettings.

        family is the model's config.model_type (FAMILIES). Without it the processor class
        decides where it can (GLPN, ZoeDepth, Depth Pro); otherwise Depth Anything's rule applies
        when the processor keeps the aspect ratio, and each side goes to its size when it does not.
        """
        family = family or family_of_processor(processor) or "depth_anything"
        if family not in FAMILIES:
            raise ValueError(
                f"no preprocessing rule for depth models of type {family!r} (supported: {', '.join(FAMILIES)})"
            )
        if not getattr(processor, "do_resize", True):
            raise ValueError("the image processor does not resize; the engine needs the model's resolution")
        code = int(getattr(processor, "resample", 2))
        if code not in RESAMPLE_NAMES:
            raise ValueError(f"unsupported resample filter {code} (supported: nearest, bilinear, bicubic)")
        normalize = bool(getattr(processor, "do_normalize", False))
        rescale = bool(getattr(processor, "do_rescale", False))
        common = dict(
            resample=RESAMPLE_NAMES[code],
            rescale_factor=float(processor.rescale_factor) if rescale else None,
            mean=_triple(processor.image_mean) if normalize else None,
            std=_triple(processor.image_std) if normalize else None,
        )
        keep_aspect = bool(getattr(processor, "keep_aspect_ratio", False))
        if family == "glpn":  # GLPNImageProcessor: each side floored to a multiple of size_divisor
            divisor = int(getattr(processor, "size_divisor", None) or 32)
            return cls(divisor, divisor, divisor, False, rule="divisor-floor", **common)
        size_h, size_w = _size_hw(processor.size)
        if family == "depth_pro":  # DepthProImageProcessor: rescale, normalize, float resize to its size
            if family_of_processor(processor) != "depth_pro":
                raise ValueError(f"a depth_pro model needs its Depth Pro processor settings (DepthProSettings), "
                                 f"got {type(processor).__name__}")
            return cls(size_h, size_w, 1, False, rule="fixed", resize_mode="float", **common)
        if family == "zoedepth":  # ZoeDepthImageProcessor: pad, then resize with align_corners=True
            multiple = float(getattr(processor, "ensure_multiple_of", None) or 1)
            multiple = int(multiple) if multiple.is_integer() else multiple
            pad = "zoedepth" if getattr(processor, "do_pad", False) else "none"
            return cls(size_h, size_w, multiple, keep_aspect, rule="dpt", pad=pad, resize_mode="align-corners", **common)
        multiple = int(getattr(processor, "ensure_multiple_of", None) or 1)
        if getattr(processor, "do_pad", False) and (getattr(processor, "size_divisor", None) or 1) > 1:
            divisor = int(processor.size_divisor)
            if multiple % divisor:
                raise ValueError(f"the processor pads to multiples of {divisor}, which the model would see")
        rule = "dpt" if family == "dpt" else ""
        return cls(size_h, size_w, multiple, keep_aspect, rule=rule, **common)

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns added on each side of an image before the resize."""
        return zoedepth_padding(height, width) if self.pad == "zoedepth" else (0, 0)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees for an image of this size."""
        pad_h, pad_w = self.padding(height, width)
        return input_size(
            self.rule, height + 2 * pad_h, width + 2 * pad_w, self.size_h, self.size_w, self.multiple, self.keep_aspect
        )

    def batches(
        self, images: Sequence[np.ndarray | torch.Tensor], device: torch.device
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, stacked model input) per target size: one forward pass each, no padding."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            check_image(image)
            groups[self.target_size(*tuple(image.shape[:2]))].append(i)
        for size, members in groups.items():
            yield members, torch.stack([self.pixels(images[i], size, device) for i in members])

    def pixels(self, image: np.ndarray | torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """One image as the model's float32 3xhxw input at `size`, computed on `device`."""
        check_image(image)
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # torch wants writable memory
        x = image.to(device).permute(2, 0, 1)[None].float()
        pad_h, pad_w = self.padding(*x.shape[-2:])
        if pad_h or pad_w:
            rows = _reflect_index(x.shape[-2], pad_h, x.device)
            cols = _reflect_index(x.shape[-1], pad_w, x.device)
            x = x[..., rows[:, None], cols[None, :]]
        if self.resize_mode == "align-corners":
            # ZoeDepth resizes the float image with torch, align_corners=True and no antialiasing
            # (always, even to the same size); rescaling first or after is the same linear map.
            x = F.interpolate(x, size=tuple(size), mode=self.resample, align_corners=True)
        elif self.resize_mode == "float":
            # Depth Pro rescales and normalizes first, then resizes the float image; both are
            # linear per channel, so the order changes float noise only.
            x = float_resize(x, size, self.resample)
        elif tuple(x.shape[-2:]) != tuple(size):
            x = self._resize(x, size)
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x[0]

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize like PIL: antialiased kernels, width pass then height pass, each to uint8 levels.

        PIL stores the intermediate image in 8 bits, so bicubic overshoot at edges is clipped
        between the passes; doing the same keeps the inputs within a grey level of PIL's.
        """
        if self.resample == "nearest":
            rows = _centres(x.shape[-2], size[0], x.device)
            cols = _centres(x.shape[-1], size[1], x.device)
            return x[..., rows[:, None], cols[None, :]]
        for step in ((x.shape[-2], size[1]), size):
            if tuple(x.shape[-2:]) != tuple(step):
                x = F.interpolate(x, size=step, mode=self.resample, antialias=True, align_corners=False)
                x = x.clamp_(0, 255).round_()
        return x
