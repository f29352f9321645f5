"""Where a job runs: attach to (or start) Ray, and lay out the actors on what it offers."""
from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Layout:
    actors: int
    options: dict            # Ray actor options
    device: str
    torch_threads: int | None
    codec_threads: int       # decode/encode threads per actor


def actor_layout(config) -> Layout:
    """One actor per GPU, or ``--workers`` CPU actors sharing the CPUs.

    On GPUs the decode/encode threads get the node's CPUs per GPU (at least ``config.threads``):
    JPEG decode and PNG encode cost about 22 ms of CPU per 0.36 MP image
    (docs/BENCHMARKS.md), so a GPU labeling hundreds of images/s needs several cores.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if config.device == "cuda" and not gpus:
        raise ConfigError("--device cuda, but the Ray cluster has no GPU")
    if gpus and config.device != "cpu":
        return Layout(gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda", None, max(config.threads, cpus // gpus))
    n = config.workers or 1
    per = max(1, cpus // n)
    return Layout(n, {"num_cpus": per}, "cpu", per, config.threads)
