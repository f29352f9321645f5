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


def lying_jpeg(width: int = 9000, height: int = 9000) -> bytes:
    """A ~1 KB JPEG whose frame header claims width x height: libjpeg "decodes" it by filling the
    missing scans with grey, 3 bytes of memory per claimed pixel."""
    data = bytearray(jpeg(scene(16, 16), quality=50))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def tar_member(name: str, data: bytes) -> bytes:
    """One regular tar member (header and padded data), name given as the reader will see it."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + _padded(data)


def sparse_member(name: str, realsize: int = 1 << 30, stored: int = 512) -> bytes:
    """An old-GNU sparse member ('S'): ``stored`` bytes in the tar, ``realsize`` once expanded
    (tarfile's extractfile expands it, zeros and all). tarfile cannot write these, so the header
    is built here from the GNU layout."""
    h = bytearray(512)

    def octal(offset: int, width: int, value: int) -> None:
        h[offset:offset + width] = b"%0*o\0" % (width - 1, value)

    h[0:len(name.encode())] = name.encode()
    octal(100, 8, 0o644), octal(108, 8, 0), octal(116, 8, 0), octal(124, 12, stored), octal(136, 12, 0)
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"
    octal(386, 12, realsize - stored), octal(398, 12, stored)   # one map entry: data at the end
    octal(483, 12, realsize)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + _padded(bytes(stored))


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def write_many_member_shard(path: Path, images: int, members: int = 8, member_bytes: int = 8 * 2**20) -> Path:
    """A shard of ``images`` samples of a photo and ``members`` incompressible members of
    ``member_bytes`` each (a sample that carries large side data: ground truth, features, video):
    every member is held until its sample is written, so what the reader reads ahead is bytes,
    not pixels (pipelines.decode.reserve counts them)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    photo = jpeg(scene(240, 320))
    with open(path, "wb") as f:
        for i in range(images):
            key = f"{path.stem}-{i:07d}"
            f.write(tar_member(f"{key}.jpg", photo))
            for j in range(members):
                f.write(tar_member(f"{key}.m{j}", os.urandom(member_bytes)))
        f.write(bytes(1024))
    return path


def write_hostile_shard(path: Path, images: int) -> Path:
    """A shard of ``images`` samples that attack a worker's memory, cycling through three kinds:
    a JPEG header claiming 9000x9000 in about a kilobyte, a GNU sparse member claiming 1 GiB
    beside a photo, and an extreme aspect ratio (10x10000). Each must cost next to nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    photo, lying, thin = jpeg(scene(240, 320)), lying_jpeg(), png(scene(10, 10000))
    with open(path, "wb") as f:
        for i in range(images):
            key = f"{path.stem}-{i:07d}"
            kind = i % 3
            if kind == 0:
                f.write(tar_member(f"{key}.jpg", lying))
            elif kind == 1:
                f.write(tar_member(f"{key}.jpg", photo) + sparse_member(f"{key}.bin"))
            else:
                f.write(tar_member(f"{key}.png", thin))
        f.write(bytes(1024))
    return path
