"""Synthetic input shards for benchmarks and tests: smooth scenes with a sky band,
JPEG-encoded, in the mixed sizes and aspect ratios a web crawl has."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SIZES = [(480, 640), (640, 480), (375, 500), (720, 1280), (512, 512), (333, 500)]


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """RGB uint8: colour gradients below a bright-blue band on top, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([
        127 + 100 * np.sin(x / max(width, 1) * 6 + seed),
        127 + 100 * np.cos(y / max(height, 1) * 5),
        127 + 60 * np.sin((x + y) / max(height + width, 1) * 9),
    ], axis=-1)
    img[: height // 3] = [90, 150, 235]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shard(path: Path, images: int, sizes=DEFAULT_SIZES, seed: int = 0) -> Path:
    """One input shard of ``images`` JPEG samples (with a json member each), written by
    the webdataset library. Sizes cycle through ``sizes``; a few base scenes are reused
    so that building a large shard stays cheap."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            h, w = sizes[i % len(sizes)]
            k = (h, w, (seed + i) % 3)
            if k not in cache:
                cache[k] = jpeg(scene(h, w, seed=k[2]))
            sink.write({"__key__": f"{path.stem}-{i:07d}", "jpg": cache[k],
                        "json": json.dumps({"synthetic": True, "index": i}).encode()})
    return path
