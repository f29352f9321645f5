"""Test data made in the test: photos-like images in many encodings, and input shards
written with the webdataset library, as a user's would be."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from engine.bench.synthetic import scene


def encode(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(height: int, width: int) -> bytes:
    """Stored as height x width with EXIF orientation 6: the oriented image is width x height."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(scene(height, width, 3), "JPEG", exif=exif, quality=92)


def odd_members() -> dict[str, tuple[str, bytes]]:
    """key -> (ext, bytes): every image kind SPEC says must be labeled."""
    base = scene(48, 64, 1)
    grey16 = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    return {
        "rotated": ("jpg", exif_rotated_jpeg(40, 70)),
        "grey": ("png", encode(Image.fromarray(base).convert("L"), "PNG")),
        "cmyk": ("jpg", encode(Image.fromarray(base).convert("CMYK"), "JPEG")),
        "rgba": ("png", encode(Image.fromarray(base).convert("RGBA"), "PNG")),
        "palette": ("png", encode(Image.fromarray(base).convert("P"), "PNG")),
        "grey16": ("png", encode(Image.fromarray(grey16), "PNG")),
        "webp": ("webp", encode(base, "WEBP", quality=90)),
        "bmp": ("bmp", encode(base, "BMP")),
        "tiff": ("tif", encode(base, "TIFF")),
    }


def bad_members() -> dict[str, tuple[str, bytes]]:
    jpeg = encode(scene(64, 64, 2), "JPEG")
    return {
        "truncated": ("jpg", jpeg[: len(jpeg) // 2]),
        "empty": ("jpg", b""),
        "notimage": ("png", b"this is a text file, not a png"),
    }


def write_shard(path, samples: list[dict]) -> str:
    """samples: dicts {"__key__": ..., ext: bytes|str|dict}; written by webdataset.TarWriter."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write({k: (json.dumps(v).encode() if isinstance(v, dict) else v) for k, v in s.items()})
    return str(path)


def photo_samples(sizes: list[tuple[int, int]], prefix: str = "img", seed: int = 0) -> list[dict]:
    return [{"__key__": f"{prefix}{i:04d}", "jpg": encode(scene(h, w, seed + i), "JPEG", quality=95),
             "json": {"caption": f"scene {i}"}, "txt": f"caption {i}".encode()}
            for i, (h, w) in enumerate(sizes)]
