"""The student's objectives (PAPER.md, "The losses, exactly"): the affine-invariant disparity
loss, its CutMix form, and feature alignment to a frozen encoder.

Disparity maps are (B, H, W) with a bool ``valid`` mask of the same shape. Invalid pixels never
reach a statistic or a gradient, so labels may hold NaN or inf there. Images without a valid pixel
add nothing and are not counted in the batch mean, so padding or an all-sky crop cannot dilute it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6  # floor for the scale s: a flat map would otherwise divide by zero


def _lower_median(d: Tensor, valid: Tensor) -> Tensor:
    """Median of each image's valid pixels, the lower of the two middle values for an even count
    (torch.median's definition), 0 for an image with none. (B, H, W) -> (B,)."""
    ranked = torch.where(valid, d, torch.inf).flatten(1).sort(dim=1).values
    n = valid.flatten(1).sum(1)
    med = ranked.gather(1, ((n - 1).clamp(min=0) // 2)[:, None]).squeeze(1)
    return torch.where(n > 0, med, 0.0)


def scale_shift_normalize(d: Tensor, valid: Tensor) -> Tensor:
    """d̂ = (d − t) / s per image, t the median and s the mean |d − t| over the valid pixels.

    A relative disparity is known only up to scale and shift; this removes both, robustly
    (median, mean absolute deviation) rather than by mean and std. 0 where invalid.
    """
    if d.ndim != 3 or d.shape != valid.shape:
        raise ValueError(f"need (B, H, W) maps and a mask of that shape, got {tuple(d.shape)} "
                         f"and {tuple(valid.shape)}")
    valid = valid.bool()
    d = torch.where(valid, d, 0.0)  # NaN/inf outside the mask would poison the gradient
    t = _lower_median(d, valid)[:, None, None]
    n = valid.flatten(1).sum(1).clamp(min=1)
    s = (torch.where(valid, (d - t).abs(), 0.0).flatten(1).sum(1) / n).clamp(min=EPS)
    return torch.where(valid, (d - t) / s[:, None, None], 0.0)


def _per_image_loss(pred: Tensor, target: Tensor, valid: Tensor, trim: float
                    ) -> tuple[Tensor, Tensor]:
    """(B,) affine-invariant loss of each image (0 for one with no valid pixel) and (B,) whether
    the image has a valid pixel."""
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    valid = valid.bool()
    err = (scale_shift_normalize(pred, valid) - scale_shift_normalize(target, valid)).abs()
    n = valid.flatten(1).sum(1)
    if trim == 0.0:
        return torch.where(valid, err, 0.0).flatten(1).sum(1) / n.clamp(min=1), n > 0
    # Depth Anything V2: the largest floor(trim * n) pixel losses are label noise, not signal.
    keep = n - (n.double() * trim).floor().long()
    ranked = torch.where(valid, err, torch.inf).flatten(1).sort(dim=1).values
    kept = torch.arange(ranked.shape[1], device=ranked.device) < keep[:, None]
    return torch.where(kept, ranked, 0.0).sum(1) / keep.clamp(min=1), n > 0


def affine_invariant_loss(pred: Tensor, target: Tensor, valid: Tensor,
                          trim: float = 0.0) -> Tensor:
    """Mean |d̂_pred − d̂_target| over each image's valid pixels, pred and target normalized
    separately, then the mean over images that have a valid pixel.

    ``trim`` drops each image's largest ``floor(trim * n)`` pixel losses (0.1 in Depth Anything
    V2). Differentiable w.r.t. ``pred``; 0 (still in the graph) when no image has a valid pixel.
    """
    loss, has = _per_image_loss(pred, target, valid, trim)
    return loss.sum() / has.sum().clamp(min=1)


def cutmix_loss(pred: Tensor, label_a: Tensor, label_b: Tensor, mask: Tensor,
                valid: Tensor | None = None, trim: float = 0.0) -> Tensor:
    """L_u = (ΣM/HW)·L^M + (Σ(1−M)/HW)·L^{1−M} per image, then the mean over images with a valid
    pixel.

    The student saw u_ab = u_a⊙M + u_b⊙(1−M), so inside M it answers to T(u_a) and outside to
    T(u_b); each region is normalized on its own, since the two labels' scales are unrelated.
    ``mask`` is bool (B, H, W), True where the pixel came from u_a.
    """
    mask = mask.bool()
    valid = torch.ones_like(mask) if valid is None else valid.bool()
    area_a = mask.flatten(1).to(pred.dtype).mean(1)
    loss_a, _ = _per_image_loss(pred, label_a, valid & mask, trim)
    loss_b, _ = _per_image_loss(pred, label_b, valid & ~mask, trim)
    has = valid.flatten(1).any(1)
    return (area_a * loss_a + (1 - area_a) * loss_b).sum() / has.sum().clamp(min=1)


def feature_alignment_loss(student: Tensor, frozen: Tensor, alpha: float = 0.85) -> Tensor:
    """1 − mean cos(f_i, f'_i) over the positions whose cosine is at most ``alpha``.

    Pulls the student's features toward a frozen DINOv2's semantics, but a position already
    within the tolerance is left out (no gradient): parts of one object may lie at different
    depths, so exact agreement would hurt. The mean is over the kept positions, not all: the
    paper's L_feat = 1 − mean_i cos leaves such a position out of the mean, and dividing by all
    positions would shrink the term, and its pull on the positions still far off, by the share
    already aligned. Features are (B, N, C) tokens or (B, C, H, W) maps of like kind (the
    trainer passes both encoders' normed patch tokens, pipelines.student.model); ``frozen`` is
    detached. 0 (still in the graph) when every position is left out.
    """
    if student.shape != frozen.shape or student.ndim not in (3, 4):
        raise ValueError(f"need equal (B, N, C) or (B, C, H, W) features, got "
                         f"{tuple(student.shape)} and {tuple(frozen.shape)}")
    cos = F.cosine_similarity(student, frozen.detach(), dim=-1 if student.ndim == 3 else 1)
    kept = cos.detach() <= alpha
    return torch.where(kept, 1 - cos, 0.0).sum() / kept.sum().clamp(min=1)
