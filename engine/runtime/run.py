"""``run_shards``: the one driver loop every job uses (label, convert-gt, evaluate, and bench
through them): actors laid out, shards scheduled with retries, a progress bar, the attempts'
telemetry summed. What a result or a permanent failure means stays with the caller."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from engine.progress import ProgressBar
from engine.runtime.attempt import Attempt, Telemetry
from engine.runtime.metrics import JobMetrics
from engine.runtime.scheduler import Scheduler
from engine.runtime.session import Layout
from pipelines.tasks import ShardTask


@dataclass
class Run:
    started_at: float
    first_ready_at: float | None = None    # when the first actor had its models loaded
    ended_at: float = 0.0
    telemetry: Telemetry = field(default_factory=Telemetry)
    estimate: dict | None = None           # the first ETA beside what happened (engine.progress)

    @property
    def startup_seconds(self) -> float:
        return (self.first_ready_at or self.started_at) - self.started_at

    @property
    def steady_seconds(self) -> float:
        """From the first ready worker to the last shard: the steady state's time."""
        return self.ended_at - (self.first_ready_at or self.started_at)


def run_shards(tasks: list[ShardTask], actor_class, spec, layout: Layout, *, max_attempts: int,
               on_result: Callable[[object], None],
               on_failure: Callable[[ShardTask, list[dict]], None] = lambda task, errors: None,
               progress: bool = True, should_stop: Callable[[], str | None] = lambda: None,
               sizes: dict | None = None, command: str = "label", output: str = "") -> Run:
    """Run ``actor_class`` (an engine actor taking a WorkerSpec) over ``tasks``; ``spec`` gets
    the layout's device and threads. ``on_result`` gets each finished attempt's flow result,
    ``on_failure`` each shard that failed ``max_attempts`` times (with every attempt's error).
    ``sizes`` (shard name -> input bytes) lets the ETA weigh shards by size; ``command`` and
    ``output`` tag the run's metrics (engine.runtime.metrics)."""
    spec = replace(spec, device=layout.device, threads=layout.codec_threads, torch_threads=layout.torch_threads)
    run = Run(started_at=time.time())
    bar = ProgressBar(len(tasks), enabled=progress, sizes=sizes or {t.name: None for t in tasks})

    metrics = JobMetrics.for_run(command, output)

    def result(a: Attempt) -> None:
        run.telemetry.add(a)
        metrics.attempt_done(a)
        on_result(a.result)
        bar.shard_done(a.result)

    def failure(task: ShardTask, errors: list[dict]) -> None:
        metrics.attempt_failed(retried=False)
        on_failure(task, errors)
        bar.shard_failed(task.name, errors[-1]["error"])

    def tick(live: dict) -> None:
        bar.started(scheduler.first_ready_at)
        bar.live(live)
        metrics.tick(len(scheduler.queue))

    scheduler = Scheduler(lambda: actor_class.options(**layout.options).remote(spec),
                          max(1, min(layout.actors, len(tasks))), max_attempts=max_attempts,
                          on_result=result, on_failure=failure, on_tick=lambda live: tick(live), on_event=bar.event,
                          should_stop=should_stop, on_retry=lambda task, err: metrics.attempt_failed(retried=True))
    try:
        scheduler.run(tasks)
    finally:
        bar.close()
        metrics.close()
        run.first_ready_at = scheduler.first_ready_at
        run.ended_at = time.time()
    run.estimate = bar.estimate(bar.images)
    return run
