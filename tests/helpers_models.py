"""Independent references for the labelers tests: PIL, numpy and the models' own processors.

Nothing here calls the engine's preprocessing, so agreement with it means something.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata


def resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def blue_sky_scene(height: int, width: int) -> np.ndarray:
    """A blue top half over a brown ground, with some texture so the depth map is not flat."""
    rng = np.random.default_rng(height * 1000 + width)
    image = np.empty((height, width, 3), np.float32)
    image[: height // 2] = (110, 160, 230)
    image[height // 2 :] = (120, 90, 60)
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def natural_photos() -> dict[str, np.ndarray]:
    """Several sizes and aspect ratios of natural images; two share a teacher target size."""
    rocket = skdata.rocket()  # 427 x 640
    return {
        "landscape": skdata.coffee(),  # 400 x 600
        "portrait": resized(skdata.astronaut(), 600, 400),
        "small": skdata.chelsea()[100:190, 200:330],  # 90 x 130
        "square": skdata.chelsea()[:300, 100:400],
        "rocket": rocket,
        "rocket_crop": np.ascontiguousarray(rocket[10:411, 20:619]),  # 401 x 599
    }


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def official_lower_bound(height, width, size, multiple):
    """The Depth Anything Resize(keep_aspect_ratio=True, resize_method='lower_bound'), rewritten."""
    scale = max(size / height, size / width)

    def side(x):
        y = int(np.round(x / multiple) * multiple)
        return int(math.ceil(x / multiple) * multiple) if y < size else y

    return side(scale * height), side(scale * width)


def reference_prediction(model, processor, image: np.ndarray) -> np.ndarray:
    """Written apart from the engine: PIL resize, processor mean/std, one image, bilinear back."""
    height, width = image.shape[:2]
    size = processor.to_dict()["size"]["height"]
    h, w = official_lower_bound(height, width, size, processor.ensure_multiple_of)
    x = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), np.float32)
    x = x * processor.rescale_factor
    x = (x - np.asarray(processor.image_mean, np.float32)) / np.asarray(processor.image_std, np.float32)
    pixels = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        depth = model(pixel_values=pixels).predicted_depth
    full = F.interpolate(depth[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return full[0, 0].numpy()


def reference_sky(model, processor, image: np.ndarray, sky_ids) -> np.ndarray:
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
    return np.isin(labels.numpy(), sky_ids)


def reference_metrics(pred, gt_disp, valid, max_depth=None):
    """np.linalg.lstsq for the alignment; the cap and metrics written out again."""
    m = valid & np.isfinite(gt_disp)
    A = np.stack([pred[m], np.ones(m.sum())], axis=1)
    (s, b), *_ = np.linalg.lstsq(A, gt_disp[m], rcond=None)
    cap = 1 / max_depth if max_depth else gt_disp[m].min()
    pd = 1 / np.clip(s * pred[m] + b, cap, None)
    gd = 1 / gt_disp[m]
    return np.mean(np.abs(pd - gd) / gd), np.mean(np.maximum(pd / gd, gd / pd) < 1.25), s, b
