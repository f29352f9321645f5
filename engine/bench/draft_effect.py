"""What ``--draft-decode`` changes in what the teacher sees, beside the float noise of the
teacher's own processor path, on the bench's photos.

The label is a function of the teacher's input, so the input is where the draft's effect is
measured model-independently: Depth Anything's 518 lower-bound input (bicubic, as its processor
resizes) made from the full decode and from the DCT-scaled decode, in grey levels (0-255, before
rescale and normalization). The yardstick is the processor path's own noise: the engine's
device resize of the full decode against PIL's resize of it, which is what the processor does
(README "The label" step 2). A draft within that noise could be the default; one past it stays a
flag (issue 25's rule). The label's own change needs a trained teacher, which a random-weight
model does not stand in for.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from labelers.preprocess import ImagePreprocess
from pipelines.decode import decode_image

DEPTH_ANYTHING = ImagePreprocess(518, 518, 14, True, "bicubic", None, None, None)   # grey levels out


def _pixels(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return DEPTH_ANYTHING.pixels(rgb, size, torch.device("cpu")).permute(1, 2, 0).numpy().astype(np.float64)


def _against(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a - b)
    return {"max_abs": round(float(diff.max()), 2), "mean_abs": round(float(diff.mean()), 3),
            "pearson": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 6)}


def draft_effect(jpegs: list[bytes]) -> dict:
    """Per comparison, the worst image's max and mean |difference| (grey levels) and its
    Pearson over all pixels and channels."""
    rows = {"draft vs full decode (engine resize)": [], "engine vs PIL resize (full decode)": []}
    for data in jpegs:
        full = decode_image(data)
        height, width = full.shape[:2]
        size = DEPTH_ANYTHING.target_size(height, width)
        drafted = decode_image(data, reduce=lambda h, w: size)
        engine_full = _pixels(full, size)
        pil_full = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BICUBIC), dtype=np.float64)
        rows["draft vs full decode (engine resize)"].append(_against(_pixels(drafted, size), engine_full))
        rows["engine vs PIL resize (full decode)"].append(_against(engine_full, pil_full))
    return {name: {"max_abs": max(r["max_abs"] for r in rs), "mean_abs": max(r["mean_abs"] for r in rs),
                   "pearson": min(r["pearson"] for r in rs)} for name, rs in rows.items()}
