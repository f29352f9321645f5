"""Threads or processes for a labeler's codec work: the same decode and encode of one shard's
photos on N threads of one process against a pool of N processes, wall-clock images/s.

The work is what a labeler actor does around the model: decode a JPEG into the array the model
gets (it must end up in the actor's process, where the device is), and encode a map the device
handed back (which starts there). A process pool pays for moving both across: the decoded image
back, the map out. Threads pay only where the GIL is held: Pillow's decoder, libpng through
imagecodecs and most of numpy release it."""
from __future__ import annotations

import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

MODELS = {"teacher": "stand-in", "teacher_output": "disparity", "sky_model": "stand-in-sky"}


def decode_one(members: dict) -> np.ndarray:
    from pipelines.decode import decode, sample_from_members

    return decode(sample_from_members(members, "bench")).image


def encode_one(job: tuple[dict, np.ndarray, np.ndarray]) -> int:
    from pipelines.decode import sample_from_members
    from pipelines.encode import encode

    members, raw, sky = job
    sample = sample_from_members(members, "bench")
    sample.height, sample.width = raw.shape     # the image's own decode is decode_one's
    sample.raw, sample.sky = raw, sky
    return sum(len(v) for v in encode(sample, MODELS).members.values())


def _rate(pool: Executor, members: list[dict], raw: np.ndarray, sky: np.ndarray) -> float:
    list(pool.map(decode_one, members[:2]))     # warm-up: imports, worker start
    t0 = time.perf_counter()
    images = list(pool.map(decode_one, members))
    sizes = list(pool.map(encode_one, [(m, raw, sky) for m in members]))
    assert len(images) == len(sizes) == len(members)
    return len(members) / (time.perf_counter() - t0)


def pool_figures(members: list[dict], raw: np.ndarray, sky: np.ndarray, workers: int | None = None) -> dict:
    """images/s of decode + encode (labels at ``raw``'s size) on 1 thread, N threads, N processes."""
    n = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(1) as one:
        single = _rate(one, members, raw, sky)
    with ThreadPoolExecutor(n) as threads:
        threaded = _rate(threads, members, raw, sky)
    with ProcessPoolExecutor(n) as processes:
        forked = _rate(processes, members, raw, sky)
    return {"workers": n, "one_thread": round(single, 2), "threads": round(threaded, 2),
            "processes": round(forked, 2)}
