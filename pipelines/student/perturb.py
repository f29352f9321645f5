"""Strong perturbations of the student's input (PAPER.md, step 4): colour jitter, grayscale,
Gaussian blur and CutMix.

Plain self-training does not help, because the student repeats the teacher's mistakes; a harder
input does. Only the student's view is perturbed: the teacher labels the clean image, and CutMix
hands back the mask and partner with which the loss mixes the labels the same way.

Images are float tensors in [0, 1], (3, H, W) or (B, 3, H, W). Every random draw comes from the
caller's CPU ``torch.Generator``, so a seed reproduces a batch exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _chance(gen: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=gen, dtype=torch.float64).item() < p


def grayscale(img: Tensor) -> Tensor:
    """ITU-R 601 luma (as PIL and torchvision), (..., 3, H, W) -> (..., 1, H, W)."""
    r, g, b = img.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(img: Tensor) -> Tensor:
    """(..., 3, H, W) RGB -> HSV, every channel in [0, 1]; hue 0 where the pixel is grey."""
    r, g, b = img.unbind(-3)
    v, lo = img.amax(-3), img.amin(-3)
    c = v - lo
    s = torch.where(v > 0, c / torch.where(v > 0, v, 1.0), 0.0)
    cs = torch.where(c > 0, c, 1.0)
    h = torch.where(v == r, ((g - b) / cs) % 6,
                    torch.where(v == g, (b - r) / cs + 2, (r - g) / cs + 4))
    return torch.stack([torch.where(c > 0, h / 6, 0.0), s, v], dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv: channel n of (5, 3, 1) is v − v·s·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6h) mod 6."""
    h, s, v = (x.unsqueeze(-3) for x in hsv.unbind(-3))
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = (n + 6 * h) % 6
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def _blend(img: Tensor, other: Tensor, factor: float) -> Tensor:
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(img: Tensor, factor: float) -> Tensor:
    return (img * factor).clamp(0, 1)


def adjust_contrast(img: Tensor, factor: float) -> Tensor:
    """Blend toward the image's mean grey level."""
    return _blend(img, grayscale(img).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(img: Tensor, factor: float) -> Tensor:
    """Blend toward the pixel's own grey."""
    return _blend(img, grayscale(img), factor)


def adjust_hue(img: Tensor, shift: float) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]); saturation and value stay."""
    hsv = rgb_to_hsv(img)
    hsv = torch.cat([(hsv[..., :1, :, :] + shift) % 1.0, hsv[..., 1:, :, :]], dim=-3)
    return hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur, radius ceil(3σ) (99.7% of the weight), reflect padding so the
    border is not darkened; the radius shrinks to fit an image smaller than the kernel."""
    h, w = img.shape[-2:]
    radius = min(max(1, math.ceil(3 * sigma)), h - 1, w - 1)
    if radius < 1:
        return img
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[-3]
    flat = F.pad(img.reshape(-1, c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    flat = F.conv2d(flat, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return flat.reshape(img.shape)


@dataclass(frozen=True)
class StrongAugment:
    """Colour jitter (with ``jitter_p``, its four parts in random order), grayscale (with
    ``grayscale_p``) and Gaussian blur (with ``blur_p``, σ uniform in ``blur_sigma``), drawn
    independently for each image of a batch."""

    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0, and hue at most 0.5")
        if not all(0 <= p <= 1 for p in (self.jitter_p, self.grayscale_p, self.blur_p)):
            raise ValueError("probabilities must be in [0, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")

    def __call__(self, img: Tensor, gen: torch.Generator) -> Tensor:
        if img.ndim not in (3, 4) or img.shape[-3] != 3 or not img.is_floating_point():
            raise ValueError(f"need float (3, H, W) or (B, 3, H, W), got {img.dtype} "
                             f"{tuple(img.shape)}")
        if img.ndim == 4:
            return torch.stack([self._one(x, gen) for x in img])
        return self._one(img, gen)

    def _one(self, img: Tensor, gen: torch.Generator) -> Tensor:
        if _chance(gen, self.jitter_p):
            jitter = (
                (adjust_brightness, max(0.0, 1 - self.brightness), 1 + self.brightness),
                (adjust_contrast, max(0.0, 1 - self.contrast), 1 + self.contrast),
                (adjust_saturation, max(0.0, 1 - self.saturation), 1 + self.saturation),
                (adjust_hue, -self.hue, self.hue),
            )
            for i in torch.randperm(len(jitter), generator=gen).tolist():
                fn, lo, hi = jitter[i]
                img = fn(img, _uniform(gen, lo, hi))
        if _chance(gen, self.grayscale_p):
            img = grayscale(img).expand_as(img).clone()
        if _chance(gen, self.blur_p):
            img = gaussian_blur(img, _uniform(gen, *self.blur_sigma))
        return img


@dataclass(frozen=True)
class CutMixResult:
    images: Tensor   # (B, 3, H, W) u_ab = u_a⊙M + u_b⊙(1−M)
    mask: Tensor     # (B, H, W) bool M, True where the pixel is the image's own (u_a)
    partner: Tensor  # (B,) long index of u_b in the batch; i itself where image i is not mixed


@dataclass(frozen=True)
class CutMix:
    """With probability ``p`` for the whole batch (as Depth Anything applies it), paste into
    each image a box of another image of the batch.

    The partners follow one random cycle over the batch, so ``partner`` is a permutation and no
    image is mixed with itself; an unmixed batch has ``partner[i] == i`` and an all-True mask.
    Each image gets its own box: area fraction uniform in ``area``, aspect ratio (width /
    height) log-uniform in ``aspect``, a side longer than the image clipped to it, placed
    wholly inside.
    """

    p: float = 0.5
    area: tuple[float, float] = (0.02, 0.40)
    aspect: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0 < self.area[0] <= self.area[1] <= 1:
            raise ValueError(f"area must be 0 < lo <= hi <= 1, got {self.area}")
        if not 0 < self.aspect[0] <= self.aspect[1]:
            raise ValueError(f"aspect must be 0 < lo <= hi, got {self.aspect}")

    def __call__(self, images: Tensor, gen: torch.Generator) -> CutMixResult:
        if images.ndim != 4:
            raise ValueError(f"need (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        u = torch.rand(b, 5, generator=gen, dtype=torch.float64)
        order = torch.randperm(b, generator=gen)
        partner = torch.arange(b)
        if b > 1 and float(torch.rand(1, generator=gen, dtype=torch.float64)) < self.p:
            partner[order] = order.roll(-1)
        mixed = partner != torch.arange(b)

        area = (self.area[0] + (self.area[1] - self.area[0]) * u[:, 1]) * (h * w)
        lo, hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        ratio = torch.exp(lo + (hi - lo) * u[:, 2])
        bh = (area / ratio).sqrt().round().clamp(1, h).long()
        bw = (area * ratio).sqrt().round().clamp(1, w).long()
        top = (u[:, 3] * (h - bh + 1)).floor().long()[:, None]
        left = (u[:, 4] * (w - bw + 1)).floor().long()[:, None]
        rows, cols = torch.arange(h)[None], torch.arange(w)[None]
        in_rows = (rows >= top) & (rows < top + bh[:, None])
        in_cols = (cols >= left) & (cols < left + bw[:, None])
        box = in_rows[:, :, None] & in_cols[:, None, :] & mixed[:, None, None]

        mask, partner = (~box).to(images.device), partner.to(images.device)
        return CutMixResult(torch.where(mask[:, None], images, images[partner]), mask, partner)
