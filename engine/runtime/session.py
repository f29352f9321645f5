"""Where a job runs: attach to (or start) Ray, and lay out the actors on what it offers."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from engine.config import ConfigError


def start_ray(config) -> bool:
    """Attach to ``--ray-address`` (or RAY_ADDRESS, which a Ray job sets) or start a local
    Ray; True when we started it."""
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")   # set inside a Ray job
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             configure_logging=False, num_cpus=os.cpu_count())
    return True


def local_resources() -> dict:
    """What the local Ray that ``start_ray`` starts would offer, without starting it (a dry run
    with its rate known): every CPU, the CUDA devices, and Ray's default share of the memory
    available (70 %; the object store takes the rest)."""
    import torch

    try:    # Ray's own rule, which sees a container's cgroup limit
        from ray._private.utils import estimate_available_memory
        available = estimate_available_memory()
    except (ImportError, AttributeError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "memory": int(0.7 * available)}


# A CPU actor's memory beside its models: the Ray worker, torch, read-ahead, the sky model's
# class maps at the image's size, encode buffers (peak worker RSS 2.8 GiB with a ViT-S teacher
# at 518 and a b0 segmenter at 512 on photos up to 1280x720, docs/BENCHMARKS.md).
ACTOR_BASE_BYTES = 3 << 30
MODEL_BYTES_FACTOR = 3          # weights, their load-time copy, activations


@dataclass(frozen=True)
class Layout:
    actors: int
    options: dict            # Ray actor options
    device: str
    torch_threads: int | None
    codec_threads: int       # decode/encode threads per actor
    rule: str = ""           # why this layout, in words (the summary and bench print it)

    def describe(self) -> str:
        threads = f" x {self.torch_threads} thread{'s' if self.torch_threads != 1 else ''}" if self.torch_threads else ""
        return f"{self.actors} {self.device} actor{'s' if self.actors != 1 else ''}{threads}: {self.rule}"


def actor_layout(config, model_bytes: int = 0, resources: dict | None = None) -> Layout:
    """One actor per GPU; on CPUs, one single-threaded actor per core, as many as memory allows,
    unless ``--workers`` says otherwise.

    On GPUs the decode/encode threads get the node's CPUs per GPU (at least ``config.threads``):
    JPEG decode and PNG encode cost about 22 ms of CPU per 0.36 MP image
    (docs/BENCHMARKS.md), so a GPU labeling hundreds of images/s needs several cores.

    On CPUs, N one-thread processes beat one N-thread process: a model's small ops do not
    split well over threads, and decode/encode of one actor overlap the models of another
    (measured by ``depth-engine bench``, which times both layouts side by side). Each actor
    holds its own copy of the models, so memory bounds the count (``model_bytes``: the job's
    weight files).
    """
    resources = ray.cluster_resources() if resources is None else resources
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if config.device == "cuda" and not gpus:
        raise ConfigError("--device cuda, but the Ray cluster has no GPU")
    if gpus and config.device != "cpu":
        return Layout(gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda", None, max(config.threads, cpus // gpus),
                      "one actor per GPU")
    if config.workers:
        n = config.workers
        rule = f"--workers {n}"
    else:
        memory = int(resources.get("memory", 0))
        fit = memory // (ACTOR_BASE_BYTES + MODEL_BYTES_FACTOR * model_bytes) if memory else cpus
        n = max(1, min(cpus, fit))
        rule = "one actor per CPU" if n == cpus else f"Ray's memory holds {fit} copies of the models for {cpus} CPUs"
    per = max(1, cpus // n)
    return Layout(n, {"num_cpus": per}, "cpu", per, config.threads, rule)


@contextmanager
def ray_session(config, model_bytes: int = 0) -> Iterator[Layout]:
    """Ray attached or started for one job, and the actor layout on it; a Ray we started is
    shut down on the way out."""
    started = start_ray(config)
    try:
        yield actor_layout(config, model_bytes)
    finally:
        if started:
            ray.shutdown()
