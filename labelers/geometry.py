"""Teacher input sizes: the official Depth Anything resize rule (SPEC §5.1).

transformers' DPTImageProcessor keeps the aspect ratio by scaling "as little as possible", which
lets the shorter side fall below the model's size (600x400 H x W -> 518x350). The official Depth
Anything code scales by the *larger* factor ("lower_bound"), so both sides stay at least the
size (600x400 -> 784x518). Labels must match the official teacher, so the engine computes the
size here and resizes itself.
"""

from __future__ import annotations

import math


def constrain_to_multiple(x: float, multiple: int, min_val: int = 0) -> int:
    """Round x to a multiple; round up instead when rounding would fall below min_val."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    y = round(x / multiple) * multiple
    if y < min_val:
        y = math.ceil(x / multiple) * multiple
    return int(y)


def teacher_input_size(
    height: int, width: int, size_h: int, size_w: int, multiple: int, keep_aspect: bool
) -> tuple[int, int]:
    """(height, width) the teacher sees for an image of height x width.

    keep_aspect: one scale s = max(size_h/H, size_w/W) for both sides, each side a multiple that is
    at least its size. Otherwise each side is scaled to its own size, then made a multiple.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not keep_aspect:
        return (
            constrain_to_multiple(size_h, multiple, min_val=size_h),
            constrain_to_multiple(size_w, multiple, min_val=size_w),
        )
    scale = max(size_h / height, size_w / width)
    return (
        constrain_to_multiple(scale * height, multiple, min_val=size_h),
        constrain_to_multiple(scale * width, multiple, min_val=size_w),
    )
