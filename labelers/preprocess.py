"""A model's image preprocessing, read from its own processor config and run in torch.

The processors resize with PIL one image at a time on the CPU. Here the same steps run as tensor
ops on the model's device: resize as PIL does (antialiased kernels, two passes through uint8;
nearest with PIL's exact sampling), rescale, normalize. Sizes come from
geometry.teacher_input_size, so the official Depth Anything rule applies and no padding ever
reaches the model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelers.geometry import teacher_input_size

# PIL resample codes (PILImageResampling) the engine reproduces; the others have no torch twin.
RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


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

    size_h: int
    size_w: int
    multiple: int
    keep_aspect: bool
    resample: str  # 'bicubic' | 'bilinear' | 'nearest'
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    def __post_init__(self) -> None:
        if self.size_h < 1 or self.size_w < 1 or self.multiple < 1:
            raise ValueError(f"bad sizes: {self.size_h}x{self.size_w}, multiple {self.multiple}")
        if self.resample not in RESAMPLE_NAMES.values():
            raise ValueError(f"resample must be nearest, bilinear or bicubic, got {self.resample!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")

    @classmethod
    def from_processor(cls, processor) -> "ImagePreprocess":
        """Read the settings from a loaded image processor (AutoImageProcessor)."""
        if not getattr(processor, "do_resize", True):
            raise ValueError("the image processor does not resize; the engine needs the model's resolution")
        size_h, size_w = _size_hw(processor.size)
        multiple = int(getattr(processor, "ensure_multiple_of", None) or 1)
        if getattr(processor, "do_pad", False) and (getattr(processor, "size_divisor", None) or 1) > 1:
            divisor = int(processor.size_divisor)
            if multiple % divisor:
                raise ValueError(f"the processor pads to multiples of {divisor}, which the model would see")
        code = int(getattr(processor, "resample", 2))
        if code not in RESAMPLE_NAMES:
            raise ValueError(f"unsupported resample filter {code} (supported: nearest, bilinear, bicubic)")
        normalize = bool(getattr(processor, "do_normalize", False))
        rescale = bool(getattr(processor, "do_rescale", False))
        return cls(
            size_h=size_h,
            size_w=size_w,
            multiple=multiple,
            keep_aspect=bool(getattr(processor, "keep_aspect_ratio", False)),
            resample=RESAMPLE_NAMES[code],
            rescale_factor=float(processor.rescale_factor) if rescale else None,
            mean=_triple(processor.image_mean) if normalize else None,
            std=_triple(processor.image_std) if normalize else None,
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees for an image of this size."""
        return teacher_input_size(height, width, self.size_h, self.size_w, self.multiple, self.keep_aspect)

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
        if tuple(x.shape[-2:]) != tuple(size):
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
