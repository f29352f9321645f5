"""``bench --compare N``: ``compare`` over a large synthetic pair of OUTPUTs, N samples each, in
shards of 100, with labels the size of a 640x480 photo's: samples/s over all of it and over a
1 % sample, the peak memory of the workers and of the driver, the bytes read, and the cost
model for a 62M-sample job.

The pair is written by the shard sink without a model (a few distinct labels, their bytes
reused; ``compare`` decodes and scores every pair anyway): what it times is reading, decoding
and scoring, which is all ``compare`` does when both sides are stored.
"""
from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.bench.synthetic import jpeg, scene
from storage.label_format import (
    DISP_MEMBER,
    JSON_MEMBER,
    SKY_MEMBER,
    disparity_png,
    mask_png,
)
from storage.sink import ShardSink
from storage.stores import open_store

PER_SHARD = 100
VARIANTS = 8
JOB = 62_000_000          # the paper's unlabeled images
JOB_PER_SHARD = 1_000     # samples per shard of that job, for the cost model


def _labels(seed: int, height: int = 480, width: int = 640) -> list[dict[str, bytes]]:
    """VARIANTS labels of one side: a smooth disparity ramp with noise and a sky band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for v in range(VARIANTS):
        sky = y < 0.15 + 0.02 * v
        d = np.clip(0.2 + 0.8 * y + 0.1 * np.sin(8 * x + v) + 0.02 * rng.standard_normal(y.shape), 0, 1)
        out.append({DISP_MEMBER: disparity_png(np.where(sky, 0.0, d)), SKY_MEMBER: mask_png(sky)})
    return out


def write_pair(root: str, n: int) -> tuple[str, str]:
    """Two OUTPUTs (A, B) of the same n keys, B's labels another draw of the same kind."""
    image = jpeg(scene(480, 640, 0))
    urls = []
    for side, seed in (("A", 1), ("B", 2)):
        store = open_store(f"{root.rstrip('/')}/{side}/")
        labels = _labels(seed)

        def shard(s: int, store=store, labels=labels) -> None:
            name = f"shard-{s:06d}"
            with ShardSink(store, name) as sink:
                for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
                    key = f"k{i:09d}"
                    members = {"jpg": image, **labels[i % VARIANTS], JSON_MEMBER: b"{}"}
                    sink.add(key, members, {"key": key, "source": f"/in/{name}.tar", "status": "ok"})
                sink.commit({"source_kind": "pseudo", "worker": "bench", "attempt": 1}, owner={"worker": "bench"})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(shard, range((n + PER_SHARD - 1) // PER_SHARD)))
        urls.append(store.url)
    return urls[0], urls[1]


def compare_figures(root: str, n: int) -> dict:
    from engine.compare import CompareConfig, compare

    t0 = time.perf_counter()
    a, b = write_pair(root, n)
    built = time.perf_counter() - t0
    runs = {}
    for name, fraction in (("all", 1.0), ("one_percent", 0.01)):
        r = compare(CompareConfig(a=a, b=b, sample=fraction, progress=False))
        runs[name] = {"sample": fraction, "pairs": r["counts"]["compared"],
                      "samples_per_second": round(r["samples_per_second"], 1),
                      "wall_seconds": round(r["wall_seconds"], 2), "startup_seconds": round(r["startup_seconds"], 2),
                      "label_bytes": r["bytes"]["labels"], "manifest_bytes": r["bytes"]["manifests"],
                      "peak_worker_rss_mb": r["peak_worker_rss_mb"], "layout": r["layout"],
                      "cpu_seconds": r["steady_seconds"] * r["workers"]}
    shards = (n + PER_SHARD - 1) // PER_SHARD
    # CPU-seconds = pairs x t_pair + shards x t_shard: t_pair from the run over all pairs, t_shard
    # (the manifest parts, the task round trip) from what the 1 % run spent beyond its pairs.
    t_pair = runs["all"]["cpu_seconds"] / runs["all"]["pairs"]
    t_shard = max(0.0, runs["one_percent"]["cpu_seconds"] - runs["one_percent"]["pairs"] * t_pair) / shards
    job_shards = JOB // JOB_PER_SHARD
    cost = lambda fraction: (JOB * fraction * t_pair + job_shards * t_shard) / 3600  # noqa: E731
    return {"samples": n, "shards": shards, "label_size": "640x480", "build_seconds": round(built, 1), "runs": runs,
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cpu_seconds_per_pair": round(t_pair, 5), "cpu_seconds_per_shard": round(t_shard, 5),
            "job": {"samples": JOB, "shards": job_shards, "cpu_hours_all": round(cost(1.0), 1),
                    "cpu_hours_one_percent": round(cost(0.01), 2)}}


def print_compare(c: dict) -> None:
    print(f"compare over {c['samples']} pairs in {c['shards']} shards ({c['label_size']} labels):")
    for name, r in c["runs"].items():
        print(f"  sample {r['sample']:g}: {r['pairs']} pairs, {r['samples_per_second']} pairs/s on {r['layout']}, "
              f"{r['label_bytes'] / 2**20:.1f} MiB of labels + {r['manifest_bytes'] / 2**20:.1f} MiB of manifests read, "
              f"peak worker RSS {r['peak_worker_rss_mb']:.0f} MiB")
    j = c["job"]
    print(f"driver peak RSS {c['driver_peak_rss_mb']:.0f} MiB; {c['cpu_seconds_per_pair'] * 1000:.1f} CPU-ms per pair, "
          f"{c['cpu_seconds_per_shard'] * 1000:.1f} per shard: {j['samples']:,} pairs in {j['shards']:,} shards take "
          f"{j['cpu_hours_all']} CPU-hours, a 1 % sample {j['cpu_hours_one_percent']}")
