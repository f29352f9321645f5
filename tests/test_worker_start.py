"""A worker that cannot start ends the job fast and says why (real Ray, real actors): its
constructor's exception is printed, and after a few start failures in a row the scheduler
stops with that cause instead of restarting workers until a half-hour timeout."""
from __future__ import annotations

import pytest
import ray

from engine.errors import ConfigError, WorkerStartError
from engine.models import resolve
from engine.runtime.actors import LabelActor, WorkerSpec
from engine.runtime.scheduler import START_FAILURES, Scheduler
from pipelines.tasks import ShardTask


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.5)
class Unloadable:
    def __init__(self):
        raise ValueError("model /m is a SegformerForSemanticSegmentation\nnot a depth model")

    def ready(self):
        return "never"


def _run(new_actor, n=2):
    events, results = [], []
    scheduler = Scheduler(new_actor, n, max_attempts=3, on_result=results.append,
                          on_failure=lambda task, errors: results.append(errors), on_event=events.append,
                          tick_seconds=0.2)
    with pytest.raises(WorkerStartError) as caught:
        scheduler.run([ShardTask("/nowhere/a.tar", "a")])
    return caught.value, events, results, scheduler


def test_start_failures_stop_the_job_with_the_cause(local_ray):
    error, events, results, scheduler = _run(lambda: Unloadable.remote())
    assert isinstance(error, ConfigError)                        # the CLI's exit 2, one line
    assert f"{START_FAILURES} failed in a row" in str(error)
    assert "ValueError: model /m is a SegformerForSemanticSegmentation not a depth model" in str(error)
    assert "\n" not in str(error)
    assert all("ValueError: model /m" in e for e in events)      # each failure said why
    assert 1 <= len(events) < START_FAILURES and not results
    assert not scheduler.actors                                  # nothing left running


def test_the_real_label_actor_refusing_other_weights(local_ray, tiny_models, tmp_path):
    """The label actor checks that the node sees the weights job.json pinned; a mismatch is a
    start failure with that reason, not a restart loop."""
    ref = resolve(tiny_models.teacher)
    spec = WorkerSpec(output=str(tmp_path / "out"), teacher=tiny_models.teacher, teacher_sha256="0" * 64,
                      sky=None, sky_sha256=None)
    error, events, _, _ = _run(lambda: LabelActor.options(num_cpus=0.5).remote(spec))
    assert f"has weights sha256 {ref.sha256[:12]}, job.json pins 000000000000" in str(error)


@ray.remote(num_cpus=0.25)
class Fine:
    def ready(self):
        return "fine"

    def run(self, task):
        return task

    def progress(self):
        return {}


def test_a_worker_killed_for_memory_is_a_retried_attempt(local_ray, monkeypatch):
    """Ray's memory monitor kills a worker with OutOfMemoryError, which is neither a task error
    nor an actor error: the attempt is retried on a replacement, never a driver traceback."""
    from ray.exceptions import OutOfMemoryError

    real_get, killed = ray.get, []

    def get(ref, *args, **kwargs):
        value = real_get(ref, *args, **kwargs)
        if isinstance(value, ShardTask) and value.attempt == 1:
            killed.append(value.name)
            raise OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.\nadvice")
        return value

    monkeypatch.setattr(ray, "get", get)
    events, done, failed = [], [], []
    scheduler = Scheduler(lambda: Fine.remote(), 1, max_attempts=2, on_result=done.append,
                          on_failure=lambda task, errors: failed.append(errors), on_event=events.append,
                          tick_seconds=0.2)
    scheduler.run([ShardTask("/x/a.tar", "a"), ShardTask("/x/b.tar", "b")])
    assert sorted(t.name for t in done) == ["a", "b"] and all(t.attempt == 2 for t in done) and not failed
    # The first result seen is killed; the worker is dropped with it, so b's first attempt was
    # either killed too (it had finished) or lost with the worker (it had not): retried alike.
    assert killed and set(killed) <= {"a", "b"}
    assert any("worker killed for memory: 1 worker(s) were killed" in e for e in events)
