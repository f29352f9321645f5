"""`train-student --ray`: the reference loop on Ray Train workers (2 on CPU, gloo), one local Ray
for the module. A run stopped early resumes through the CLI where it stopped, every rank keeps its
place in the data, and a worker's configuration error is one line and exit 2."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import ray
from test_train_student import cfg, setup  # noqa: F401 - the module fixture: tiny OUTPUTs and models

from pipelines.student.on_ray import (
    Layout,
    RayScaling,
    WorkerFailed,
    _one_line,
    layout,
    train_on_ray,
)

CPU_NODE = {"CPU": 8.0}
GPU_NODE = {"CPU": 7.0, "GPU": 1.0}
GPU_CLUSTER = [{"CPU": 4.0}, *[GPU_NODE] * 4]       # a CPU head beside four one-GPU nodes


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_layout_defaults_follow_the_cluster():
    assert layout(RayScaling(), [CPU_NODE]) == Layout(workers=2, gpus=0, cpus=4.0)
    # A worker per GPU, with the CPUs that go with it.
    assert layout(RayScaling(), GPU_CLUSTER) == Layout(workers=4, gpus=1, cpus=7.0)
    assert layout(RayScaling(workers=2, cpus_per_worker=2), [GPU_NODE] * 4) == Layout(2, 1, 2.0)
    assert layout(RayScaling(gpus_per_worker=0, workers=3), [CPU_NODE]) == Layout(3, 0, 2.0)


@pytest.mark.parametrize("scaling, nodes, needle", [
    (RayScaling(gpus_per_worker=2), GPU_CLUSTER, "--gpus-per-worker must be 0 or 1"),
    (RayScaling(workers=0), GPU_CLUSTER, "--ray-workers must be at least 1"),
    (RayScaling(gpus_per_worker=1), [CPU_NODE], "--gpus-per-worker 1, but the Ray cluster has no GPU"),
    (RayScaling(workers=5), GPU_CLUSTER, "5 workers with a GPU each, but the Ray cluster has 4"),
    (RayScaling(workers=4, cpus_per_worker=8), GPU_CLUSTER, "cannot place 4 workers of 8 CPU(s) and 1 GPU each"),
    (RayScaling(workers=3, cpus_per_worker=4), [CPU_NODE], "cannot place 3 workers of 4 CPU(s) each"),
])
def test_layouts_the_cluster_cannot_place_are_refused(scaling, nodes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        layout(scaling, nodes)


def test_a_worker_failure_becomes_one_line():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    def wrapped(e):
        return UserExceptionWithTraceback(e, traceback_str=f"Traceback ...\n{type(e).__name__}: {e}")

    peer_gone = wrapped(RuntimeError("Connection closed by peer\n(gloo details)"))
    refused = _one_line(WorkerGroupError("x", {0: peer_gone, 1: wrapped(ValueError("no shard for rank 1"))}))
    assert type(refused) is ValueError and str(refused) == "no shard for rank 1"
    failed = _one_line(WorkerGroupError("x", {1: peer_gone}))
    assert isinstance(failed, WorkerFailed)
    assert str(failed) == "rank 1 failed: RuntimeError: Connection closed by peer"


def test_two_workers_stop_then_the_cli_resumes_to_the_end(setup, local_ray, capsys, monkeypatch):
    """--out relative to where the command runs, as a user types it (Ray Train moves its workers
    into a directory of its own)."""
    from engine.cli import main

    tmp, outs, student, frozen = setup
    monkeypatch.chdir(tmp)
    run = tmp / "ray-run"
    first = train_on_ray(replace(cfg(setup, "ray-run", steps=8, stop_after=4, save_every=2), out="ray-run"),
                         RayScaling(workers=2))
    assert [h["step"] for h in first] == [1, 2, 3, 4]
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # Both ranks' places in the data, each its own share.
    assert [s["pseudo"]["rank"] for s in state["streams"]] == [0, 1]
    assert all(s[kind]["consumed"] for s in state["streams"] for kind in ("labeled", "pseudo"))

    # The same Ray (already initialized here): the CLI attaches to it and leaves it running.
    code = main(["train-student", "--labeled", outs["labeled"], "--pseudo", outs["pseudo"], "--student", student,
                 "--frozen", frozen, "--out", "ray-run", "--steps", "8", "--crop", "56", "--lr", "1e-3",
                 "--save-every", "2", "--ray", "--ray-workers", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "step 8: total" in out
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 9))
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 8 and [s["labeled"]["rank"] for s in state["streams"]] == [0, 1]
    assert ray.is_initialized()


def test_a_config_error_in_the_workers_is_one_line_and_exit_2(setup, local_ray, capsys):
    """The workers refuse a split that leaves a rank without a shard (before any model loads); the
    driver shows their reason as the CLI shows any configuration error."""
    import shutil

    from engine.cli import main

    tmp, outs, student, frozen = setup
    one = tmp / "one-shard"
    shutil.copytree(outs["labeled"], one)
    for extra in [*sorted((one / "shards").glob("*.tar"))[1:], *sorted((one / "manifest").glob("*.parquet"))[1:]]:
        extra.unlink()
    code = main(["train-student", "--labeled", str(one), "--pseudo", outs["pseudo"], "--student", student,
                 "--frozen", frozen, "--out", str(tmp / "ray-refused"), "--steps", "2", "--crop", "56",
                 "--ray", "--ray-workers", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "depth-engine: train-student: 2 ranks but the labeled OUTPUTs hold 1 shard with samples to train on: "
        "every rank needs at least one (use fewer ranks or more shards)")


def test_ray_flags_need_ray(tmp_path, capsys):
    from engine.cli import main

    code = main(["train-student", "--labeled", "a", "--pseudo", "b", "--student", "s", "--frozen", "f",
                 "--out", str(tmp_path), "--ray-workers", "2"])
    assert code == 2 and "need --ray" in capsys.readouterr().err
