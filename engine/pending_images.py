"""The images pending in INPUT's shards, for ``label --dry-run`` (engine.dry_run).

img2dataset leaves its own counts beside each shard: ``<shard>_stats.json`` (``successes``: the
samples the tar holds) and ``<shard>.parquet`` (one row per URL tried, ``status == "success"``
in the tar). Where they exist they are exact. The other shards are sampled in a deterministic
order; the sampled shards' samples are counted from their tar headers (images unread) and the
images per input byte extrapolated to the bytes left, with the sample's spread and the
extrapolation's standard error said. Reads only.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from storage import layout
from storage.label_format import IMAGE_EXTENSIONS
from storage.objectstore import ObjectNotFound
from storage.shards import ShardFormatError, iter_sample_names
from storage.stores import locate

SAMPLE_SHARDS = 16                 # shards counted first when no sidecar gives their images
MAX_SAMPLE_SHARDS = 64             # and at most, when those first ones spread widely
TARGET_ERROR = 0.025               # the relative standard error of images per byte aimed at
SAMPLE_BYTES = 256 * 2**20         # read at most this much of one sampled shard
IO_THREADS = 16                    # parallel sidecar GETs, HEADs and sampled shards


@dataclass(frozen=True)
class ShardCount:
    """One sampled shard: its images (keys with an image member) in the bytes read; all of the
    shard when ``complete``."""

    url: str
    size: int
    bytes_read: int
    images: int
    complete: bool

    @property
    def images_per_byte(self) -> float:
        return self.images / self.bytes_read if self.bytes_read else 0.0


@dataclass(frozen=True)
class ImageEstimate:
    images: int
    method: str                    # "img2dataset stats" | "img2dataset parquet" | "sample" | "mixed" | "none"
    from_stats: int = 0            # shards counted by their _stats.json
    from_parquet: int = 0          # shards counted by their .parquet
    estimated: int = 0             # shards sampled or extrapolated
    sample: dict | None = None     # shards, of, images, bytes, images_per_mib, relative_std, relative_standard_error


def sidecar_keys(key: str) -> tuple[str, str]:
    """img2dataset's files beside shard ``00042.tar``: ``00042_stats.json`` and ``00042.parquet``."""
    stem = layout.strip_tar_suffix(key)
    return f"{stem}_stats.json", f"{stem}.parquet"


def count_from_stats(data: bytes) -> int | None:
    """``successes`` of an img2dataset stats file: the samples its tar holds."""
    try:
        n = json.loads(data).get("successes")
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n >= 0 else None


def count_from_parquet(data: bytes) -> int | None:
    """Rows with status ``success`` of an img2dataset shard parquet (one row per URL tried)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data), columns=["status"])
    except (OSError, ValueError, KeyError):      # not parquet, or no status column
        return None
    return int(pc.sum(pc.equal(table.column("status"), "success")).as_py() or 0)


def sidecar_count(url: str) -> tuple[int | None, str | None]:
    """The shard's images from img2dataset's stats, else its parquet; (None, None) without."""
    store, key = locate(url)
    for side, read, how in zip(sidecar_keys(key), (count_from_stats, count_from_parquet), ("stats", "parquet")):
        try:
            n = read(store.get(side))
        except (ObjectNotFound, FileNotFoundError, IsADirectoryError):
            continue
        if n is not None:
            return n, how
    return None, None


def choose_sample(urls: list[str], k: int) -> list[str]:
    """``k`` shards chosen by a hash of their file names: the same on every run and wherever the
    input lives, and blind to a period in the naming (every 10th shard the large one) that even
    spacing could hit."""
    return sorted(urls, key=lambda u: hashlib.sha256(posixpath.basename(u).encode()).hexdigest())[:k]


def count_images(url: str, size: int, max_bytes: int = SAMPLE_BYTES) -> ShardCount:
    """Images in one shard from its tar headers (data skipped unread), stopping after
    ``max_bytes`` of input: then the images per byte of what was read stand for the shard."""
    store, key = locate(url)
    counted = _Counted()
    images, complete = 0, True
    with store.open_read(key) as stream:
        counted.stream = stream
        try:
            for _, exts in iter_sample_names(counted):
                images += any(e in IMAGE_EXTENSIONS for e in exts)
                if counted.bytes >= max_bytes:
                    complete = False
                    break
        except ShardFormatError:    # label fails such a shard after its complete samples: count those
            complete = False
    return ShardCount(url, size, size if complete else counted.bytes, images, complete)


class _Counted:
    """A read-only stream that counts the bytes taken from it (compressed, as stored)."""

    stream = None
    bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        return data


def extrapolate(counts: list[ShardCount], left_bytes: int, population: int) -> tuple[float, dict]:
    """Images in ``left_bytes`` more input, at the sample's images per byte (total images over
    total bytes read: a large shard weighs as much as its bytes), and the sample's spread."""
    images, read = sum(c.images for c in counts), sum(c.bytes_read for c in counts)
    per_byte = images / read if read else 0.0
    per_mib = [c.images_per_byte * 2**20 for c in counts if c.bytes_read]
    spread = {"shards": len(counts), "of": population, "images": images, "bytes": read,
              "images_per_mib": {"min": round(min(per_mib), 3), "mean": round(per_byte * 2**20, 3),
                                 "max": round(max(per_mib), 3)} if per_mib else None,
              "relative_std": round(statistics.pstdev(per_mib) / statistics.fmean(per_mib), 4)
              if len(per_mib) > 1 and statistics.fmean(per_mib) else None,
              "relative_standard_error": _rounded(ratio_error(counts, population))}
    return per_byte * left_bytes, spread


def ratio_error(counts: list[ShardCount], population: int) -> float | None:
    """The relative standard error of the sample's images per byte: the ratio estimator's, with
    the finite population correction (all shards counted: 0). One sigma of the extrapolation."""
    k, x, y = len(counts), [c.bytes_read for c in counts], [c.images for c in counts]
    if k < 2 or not sum(y):
        return None
    r = sum(y) / sum(x)
    residual = sum((yi - r * xi) ** 2 for xi, yi in zip(x, y)) / (k - 1)
    return math.sqrt(max(0.0, 1 - k / population) * residual / k) / (sum(x) / k) / r


def shards_needed(counts: list[ShardCount], population: int, target: float) -> int:
    """How many shards the sample needs for ``target`` relative standard error, at the spread
    seen so far (the same formula solved for the sample size)."""
    error = ratio_error(counts, population)
    if error is None or error <= target:
        return len(counts)
    n0 = len(counts) * (error / target) ** 2 / max(1e-9, 1 - len(counts) / population)   # without the correction
    return math.ceil(n0 / (1 + n0 / population))


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def input_size(url: str) -> int:
    store, key = locate(url)
    info = store.info(key)
    return info.size if info else 0


def estimate_images(urls: list[str], *, sample_shards: int = SAMPLE_SHARDS,
                    max_sample_shards: int = MAX_SAMPLE_SHARDS, max_bytes: int = SAMPLE_BYTES,
                    threads: int = IO_THREADS) -> ImageEstimate:
    """Pending images of ``urls``: img2dataset's counts where they exist, the rest sampled:
    ``sample_shards`` first, more (up to ``max_sample_shards``) while the relative standard
    error of images per byte is over TARGET_ERROR.

    Sidecars are looked for beside every shard when the first has one (a bare input then
    costs one request, not one per shard)."""
    if not urls:
        return ImageEstimate(0, "none")
    with ThreadPoolExecutor(threads) as pool:
        first = sidecar_count(urls[0])
        known = [first, *pool.map(sidecar_count, urls[1:])] if first[0] is not None else [(None, None)] * len(urls)
        unknown = [u for u, (n, _) in zip(urls, known) if n is None]
        sizes = dict(zip(unknown, pool.map(input_size, unknown)))
        order, counts = choose_sample(unknown, len(unknown)), []
        k = min(sample_shards, len(order))
        while True:   # a wide spread asks for more shards, up to max_sample_shards
            counts += pool.map(lambda u: count_images(u, sizes[u], max_bytes), order[len(counts):k])
            want = min(shards_needed(counts, len(order), TARGET_ERROR), len(order), max_sample_shards)
            if want <= k:
                break
            k = want
    exact = sum(n for n, _ in known if n is not None)
    by = {how: sum(h == how for _, h in known) for how in ("stats", "parquet")}
    spread = None
    if unknown:
        done = [c for c in counts if c.complete]
        left = sum(sizes.values()) - sum(c.size for c in done)
        more, spread = extrapolate(counts, left, len(unknown))
        exact += sum(c.images for c in done) + more
    sources = [how for how, n in (("img2dataset stats", by["stats"]), ("img2dataset parquet", by["parquet"]),
                                  ("sample", len(unknown))) if n]
    return ImageEstimate(round(exact), sources[0] if len(sources) == 1 else "mixed", by["stats"], by["parquet"],
                         len(unknown), spread)
