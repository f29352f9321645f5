"""Teacher input sizes: the official Depth Anything resize rule (SPEC §5.1), and each other
depth family's own rule (input_size).

transformers' DPTImageProcessor keeps the aspect ratio by scaling "as little as possible", which
lets the shorter side fall below the model's size (600x400 H x W -> 518x350). The official Depth
Anything code scales by the *larger* factor ("lower_bound"), so both sides stay at least the
size (600x400 -> 784x518). Labels must match the official teacher, so the engine computes the
size here and resizes itself.

The other families follow their own processors, so that a label equals what transformers'
depth-estimation pipeline gives for that model: DPT and ZoeDepth scale "as little as possible"
(rule "dpt"), GLPN floors each side to a multiple of its size_divisor ("divisor-floor"),
ZoeDepth first reflect-pads the image (zoedepth_padding), and Depth Pro takes every image at its
one fixed size ("fixed", aspect not kept).
"""

from __future__ import annotations

import math

# Depth families (config.model_type) whose own preprocessing the engine reproduces.
FAMILIES = ("depth_anything", "dpt", "glpn", "zoedepth", "depth_pro")


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


RULES = ("lower-bound", "fixed", "dpt", "divisor-floor")


def dpt_input_size(
    height: int, width: int, size_h: int, size_w: int, multiple: float, keep_aspect: bool
) -> tuple[int, int]:
    """transformers' DPT/ZoeDepth get_resize_output_image_size, rewritten.

    keep_aspect: one scale for both sides, the one of size_h/H and size_w/W closer to 1 ("as
    little as possible"; the height's on a tie). Otherwise each side gets its own scale. Each side
    is then rounded to the nearest multiple (half to even), with no floor; a fractional multiple
    (ZoeDepth's default 1/32) gives a float that is truncated, as the processors do.
    """
    scale_h, scale_w = size_h / height, size_w / width
    if keep_aspect:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    new_h = int(round(scale_h * height / multiple) * multiple)
    new_w = int(round(scale_w * width / multiple) * multiple)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"a {height}x{width} image would reach the model as {new_h}x{new_w}")
    return new_h, new_w


def divisor_floor_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """GLPN: each side rounded down to a multiple of size_divisor (no other resize)."""
    new_h, new_w = height // divisor * divisor, width // divisor * divisor
    if new_h < 1 or new_w < 1:
        raise ValueError(f"a {height}x{width} image is smaller than the model's size divisor {divisor}")
    return new_h, new_w


def zoedepth_padding(height: int, width: int) -> tuple[int, int]:
    """ZoeDepth's reflect padding on each side: int(sqrt(side / 2) * 3) rows and columns."""
    return int(math.sqrt(height / 2) * 3), int(math.sqrt(width / 2) * 3)


def input_size(
    rule: str, height: int, width: int, size_h: int, size_w: int, multiple: float, keep_aspect: bool
) -> tuple[int, int]:
    """(height, width) the model sees for an image of height x width under a family's rule.

    lower-bound / fixed: teacher_input_size (Depth Anything; keep_aspect picks between them);
    dpt: dpt_input_size; divisor-floor: divisor_floor_size with multiple as the divisor.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if rule in ("lower-bound", "fixed"):
        return teacher_input_size(height, width, size_h, size_w, int(multiple), rule == "lower-bound")
    if rule == "dpt":
        return dpt_input_size(height, width, size_h, size_w, multiple, keep_aspect)
    if rule == "divisor-floor":
        return divisor_floor_size(height, width, int(multiple))
    raise ValueError(f"unknown resize rule {rule!r}; expected one of {RULES}")
