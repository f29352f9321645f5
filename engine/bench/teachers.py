"""``bench --teachers``: each transformers depth family's teacher in the engine beside the best
the same model does through transformers itself, on the same photos, side by side in one run.

For a random-weight model of each family (labelers.random_models.save_random_family), on N
photos of mixed sizes, after a warm-up, median of ``repeats``, all on the CPU in float32:

- pipeline: ``pipeline("depth-estimation")``, one image at a time: what one writes first;
- batched: the library as well as it allows: its processor over every image, one forward per
  processed size (its PIL processors cannot stack mixed sizes), ``post_process_depth_estimation``
  with the images' sizes;
- engine: ``Teacher.load(path).predict(images)``: its torch preprocessing, one forward per
  target size, its restore.

The engine's maps are compared with the pipeline's (Pearson, per image). A family whose
transformers processor needs torchvision (ZoeDepth's post-processing, Depth Pro's processor)
gets the engine's figure alone where torchvision is not installed.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from labelers.geometry import FAMILIES

TEACHER_IMAGES = 6
# (H, W), cycled: image i and i + 4 share a size (and so a target size), not a photo.
PHOTO_SIZES = [(375, 500), (500, 375), (300, 400), (384, 384)]
# What each family's transformers processor needs beyond PIL, for the reference figures.
REFERENCE_NEEDS = {"zoedepth": "torchvision", "depth_pro": "torchvision"}


def photos(count: int) -> list[np.ndarray]:
    """``count`` of scikit-image's colour photos (uint8 HxWx3), resized (bilinear) to the cycled
    sizes: natural content, so the depth maps compared are not flat."""
    from PIL import Image
    from skimage import data

    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    out = []
    for i in range(count):
        height, width = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        source = sources[(i + i // len(PHOTO_SIZES)) % len(sources)]
        out.append(np.asarray(Image.fromarray(source).resize((width, height), Image.BILINEAR)))
    return out


def missing_for_reference(family: str) -> str | None:
    """The package transformers lacks here to run this family's reference, or None."""
    need = REFERENCE_NEEDS.get(family)
    return need if need and importlib.util.find_spec(need) is None else None


def library_batched(model, processor, images: list[np.ndarray]) -> list[np.ndarray]:
    """transformers' processor over all images, one forward per processed size, its own
    post-processing back to each image's size (passed as the pipeline passes it: ZoeDepth reads
    it as the source size whose padding it removes)."""
    import torch

    inputs = processor(images=images)["pixel_values"]
    groups = defaultdict(list)
    for i, x in enumerate(inputs):
        groups[tuple(x.shape)].append(i)
    out = [None] * len(images)
    with torch.inference_mode():
        for members in groups.values():
            outputs = model(pixel_values=torch.stack([torch.as_tensor(inputs[i]) for i in members]))
            results = processor.post_process_depth_estimation(outputs, [images[i].shape[:2] for i in members])
            for i, result in zip(members, results):
                out[i] = result["predicted_depth"].float().numpy()
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def rate(images: int, seconds: list[float]) -> dict:
    """Median images/s of the repeats and their spread."""
    per = [images / s for s in seconds]
    return {"images_per_second": round(statistics.median(per), 3), "min": round(min(per), 3),
            "max": round(max(per), 3)}


def _runs(family: str, path: Path, images: list[np.ndarray]) -> tuple[dict, dict]:
    """(name -> a function giving every image's raw map, the engine's last; facts about the inputs)."""
    from labelers.teacher import Teacher

    teacher = Teacher.load(str(path))
    engine = {"engine": lambda: [p.raw for p in teacher.predict(images)]}
    sizes = [teacher.target_size(*image.shape[:2]) for image in images]
    facts = {"teacher_inputs": list(dict.fromkeys(f"{h}x{w}" for h, w in sizes))}
    missing = missing_for_reference(family)
    if missing:
        return engine, {**facts, "reference": f"needs {missing}"}
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    model = AutoModelForDepthEstimation.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    estimator = pipeline("depth-estimation", model=model, image_processor=processor, device="cpu")
    pil = [Image.fromarray(image) for image in images]
    theirs = [tuple(x.shape[-2:]) for x in processor(images=images)["pixel_values"]]
    return ({"pipeline": lambda: [estimator(im)["predicted_depth"].float().numpy() for im in pil],
             "batched": lambda: library_batched(model, processor, images), **engine},
            {**facts, "inputs_differ": sum(a != b for a, b in zip(sizes, theirs)), "reference": None})


def family_figures(family: str, path: Path, images: list[np.ndarray], repeats: int) -> dict:
    """One family's rates, interleaved per repeat so that a slower spell of the machine hits all
    three alike, their ratios, and the engine's agreement with the pipeline."""
    runs, facts = _runs(family, path, images)
    maps = {name: run() for name, run in runs.items()}  # the warm-up; its maps are compared
    seconds = defaultdict(list)
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    figures = {name: rate(len(images), s) for name, s in seconds.items()}
    out = {"family": family, **facts, **figures}
    if "pipeline" in maps:
        engine = figures["engine"]["images_per_second"]
        # Depth Pro's pipeline gives depth, the engine its model's inverse depth.
        theirs = [1 / m for m in maps["pipeline"]] if family == "depth_pro" else maps["pipeline"]
        out.update({"engine_over_pipeline": round(engine / figures["pipeline"]["images_per_second"], 2),
                    "engine_over_batched": round(engine / figures["batched"]["images_per_second"], 2),
                    "pearson_min": round(min(pearson(a, b) for a, b in zip(maps["engine"], theirs)), 6)})
    return out


def teacher_figures(root: Path, *, images: int = TEACHER_IMAGES, repeats: int = 3, scale: str = "small") -> dict:
    """Every family's figures on the same ``images`` photos, each model saved under ``root``."""
    import torch

    from labelers.random_models import save_random_family

    batch = photos(images)
    rows = []
    for family in FAMILIES:
        t0 = time.perf_counter()
        path, config = save_random_family(root / f"{family}-{scale}", family, scale=scale)
        rows.append({**family_figures(family, path, batch, repeats), "model": config,
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
    return {"device": "cpu", "dtype": "float32", "torch_threads": torch.get_num_threads(), "images": images,
            "sizes": [f"{w}x{h}" for h, w in PHOTO_SIZES[:images]], "repeats": repeats, "families": rows}


def print_teachers(t: dict) -> None:
    print(f"each teacher family on {t['device']} ({t['dtype']}, {t['torch_threads']} threads): {t['images']} photos "
          f"({', '.join(t['sizes'])}), images/s, median of {t['repeats']} after a warm-up")
    print(f"{'family':16}{'pipeline':>10}{'batched':>10}{'engine':>10}{'eng/pipe':>10}{'eng/batch':>10}"
          f"{'Pearson':>10}{'wall s':>8}  teacher inputs; model")
    for f in t["families"]:
        if f["reference"]:
            cells = f"{'-':>10}{'-':>10}{f['engine']['images_per_second']:>10.3f}{'reference: ' + f['reference']:>30}"
        else:
            cells = (f"{f['pipeline']['images_per_second']:>10.3f}{f['batched']['images_per_second']:>10.3f}"
                     f"{f['engine']['images_per_second']:>10.3f}{f['engine_over_pipeline']:>10.2f}"
                     f"{f['engine_over_batched']:>10.2f}{f['pearson_min']:>10.5f}")
        differ = f" ({f['inputs_differ']} input(s) unlike the processor's)" if f.get("inputs_differ") else ""
        print(f"{f['family']:16}{cells}{f['wall_seconds']:>8.1f}  {', '.join(f['teacher_inputs'])}{differ}; "
              f"{f['model']}")
