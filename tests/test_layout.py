"""The actor layout on a real local Ray: one single-threaded actor per CPU unless memory or
--workers say otherwise; one per GPU where there are GPUs (tests/test_cuda.py)."""
from __future__ import annotations

import pytest
import ray

from engine.config import LabelConfig
from engine.runtime.session import ACTOR_BASE_BYTES, MODEL_BYTES_FACTOR, actor_layout


@pytest.fixture(scope="module")
def four_cpus():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray.cluster_resources()
    ray.shutdown()


def config(**kw) -> LabelConfig:
    return LabelConfig(input="x", output="y", teacher="t", sky=None, device="cpu", **kw)


def test_one_single_threaded_actor_per_cpu(four_cpus):
    lay = actor_layout(config())
    assert (lay.actors, lay.options, lay.torch_threads) == (4, {"num_cpus": 1}, 1)
    assert lay.describe() == "4 cpu actors x 1 thread: one actor per CPU"


def test_workers_overrides_the_rule(four_cpus):
    lay = actor_layout(config(workers=1))
    assert (lay.actors, lay.options, lay.torch_threads) == (1, {"num_cpus": 4}, 4)
    assert "--workers 1" in lay.describe()


def test_memory_bounds_the_actors(four_cpus):
    """Models so large that Ray's memory holds two copies: two actors of two threads."""
    memory = int(four_cpus["memory"])
    per_actor = memory // 2 - 1
    model_bytes = (per_actor - ACTOR_BASE_BYTES) // MODEL_BYTES_FACTOR
    lay = actor_layout(config(), model_bytes=model_bytes)
    assert (lay.actors, lay.options, lay.torch_threads) == (2, {"num_cpus": 2}, 2)
    assert "memory holds 2 copies" in lay.describe()
    huge = actor_layout(config(), model_bytes=memory)      # not even one fits: still one actor
    assert (huge.actors, huge.torch_threads) == (1, 4)
