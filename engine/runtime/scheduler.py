"""Shards to actors, dynamically: each ready actor holds at most two shards (one running,
one queued so it never idles between shards); a faster actor simply comes back sooner.

One retry rule for every failure: an attempt that raised, or whose actor died (process
killed, node lost), is retried, on whichever actor is free, until ``max_attempts``. A dead
actor is replaced. The replacement gets work only once it has loaded its models, so a
cluster that lost a node goes on with the actors it has while the replacement waits for
room. The caller decides what a result or a permanent failure means (counters, failed/
markers): this loop only schedules. What comes back is the actors' attempt envelope
(engine.runtime.attempt), whatever the flow.
"""
from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import (
    GetTimeoutError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
    WorkerCrashedError,
)

from engine.errors import JobAborted, WorkerStartError
from pipelines.tasks import ShardTask

PER_ACTOR = 2
START_FAILURES = 3      # workers failing to start, in a row, before the job stops (exit 2)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)?: ")


def creation_error(exc: BaseException) -> str:
    """The remote exception of an actor that died in its constructor, as one line
    ("Type: message"), taken from the traceback Ray carries in its message."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", getattr(exc, "error_msg", "") or str(exc)).splitlines()]
    starts = [i for i, ln in enumerate(lines) if _EXCEPTION_LINE.match(ln)]
    if not starts:
        return next((ln.strip() for ln in reversed(lines) if ln.strip()), type(exc).__name__)
    return " ".join(ln.strip() for ln in lines[starts[-1]:] if ln.strip())


def describe(exc: BaseException) -> str:
    """One line for the failure of an attempt (the remote traceback stays in the logs), with
    credentials blanked: it goes to the failed/ record and the terminal."""
    from storage.objectstore import redact

    return redact(_describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        lines = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()
    if isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False):
        return f"worker could not start: {creation_error(exc)}"
    if isinstance(exc, RayActorError):
        lines = str(exc).strip().splitlines()
        return f"worker died: {lines[0] if lines else type(exc).__name__}"
    if isinstance(exc, OutOfMemoryError):   # Ray's memory monitor killed the worker
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"worker killed for memory: {first[:300]}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Actor:
    handle: object
    ready_ref: object | None        # resolves once the models are loaded; None when ready
    name: str = "starting"
    load: int = 0


class Scheduler:
    def __init__(self, new_actor: Callable[[], object], n_actors: int, *, max_attempts: int,
                 on_result: Callable[[object], None],
                 on_failure: Callable[[ShardTask, list[dict]], None],
                 on_tick: Callable[[dict], None] = lambda live: None,
                 on_event: Callable[[str], None] = lambda msg: None,
                 should_stop: Callable[[], str | None] = lambda: None,
                 on_retry: Callable[[ShardTask, dict], None] = lambda task, err: None,
                 tick_seconds: float = 1.0, start_timeout: float = 1800.0):
        self.new_actor, self.n_actors, self.max_attempts = new_actor, n_actors, max_attempts
        self.on_result, self.on_failure, self.on_tick, self.on_event = on_result, on_failure, on_tick, on_event
        self.should_stop, self.tick_seconds, self.start_timeout = should_stop, tick_seconds, start_timeout
        self.on_retry = on_retry            # a failed attempt that goes back to the queue
        self.queue: deque[ShardTask] = deque()
        self.errors: dict[str, list[dict]] = {}
        self.actors: list[_Actor] = []
        self.inflight: dict = {}            # ObjectRef -> (task, _Actor, started)
        self.no_ready_since: float | None = None
        self.first_ready_at: float | None = None   # when the first actor had its models loaded
        self.start_failures = 0             # actors that failed in their constructor, in a row

    # -- actors ---------------------------------------------------------------------
    def _spawn(self) -> None:
        handle = self.new_actor()
        self.actors.append(_Actor(handle, handle.ready.remote()))

    def _poll_starting(self) -> None:
        for a in self.actors:
            if a.ready_ref is None:
                continue
            done, _ = ray.wait([a.ready_ref], timeout=0)
            if not done:
                continue
            try:
                a.name = ray.get(a.ready_ref)
                a.ready_ref = None
                self.first_ready_at = self.first_ready_at or time.time()
                self.start_failures = 0
            except RayError as exc:
                # A worker that cannot load its models fails every shard: that is not retryable.
                if isinstance(exc, RayTaskError):
                    raise JobAborted(f"a worker could not start: {describe(exc)}") from None
                self.actors.remove(a)
                if getattr(exc, "actor_init_failed", False):
                    # Its constructor raised: a node without the model, a model that will not load.
                    # Say why at once, and stop after a few in a row rather than restart forever.
                    self.start_failures += 1
                    if self.start_failures >= START_FAILURES:
                        raise WorkerStartError(f"workers cannot start ({self.start_failures} failed in a row): "
                                               f"{creation_error(exc)}") from None
                self.on_event(f"a starting worker died ({describe(exc)}); starting another")
                self._spawn()

    def _ready(self) -> list[_Actor]:
        return [a for a in self.actors if a.ready_ref is None]

    def _drop(self, actor: _Actor, why: str) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
            try:
                ray.kill(actor.handle)      # dead already, or about to be: never left holding its CPUs
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.on_event(f"worker {actor.name} lost ({why}); its shards will be retried, starting a replacement")
            self._spawn()

    # -- shards ---------------------------------------------------------------------
    def _dispatch(self) -> None:
        for a in sorted(self._ready(), key=lambda a: a.load):
            while self.queue and a.load < PER_ACTOR:
                task = self.queue.popleft()
                self.inflight[a.handle.run.remote(task)] = (task, a, time.time())
                a.load += 1

    def _finished(self, ref) -> None:
        task, actor, started = self.inflight.pop(ref)
        actor.load -= 1
        try:
            self.on_result(ray.get(ref))
            return
        except RayError as exc:   # raised, died, killed for memory, object lost: all retried
            err = {"attempt": task.attempt, "error": describe(exc), "worker": actor.name,
                   "started": started, "ended": time.time()}
            if isinstance(exc, (RayActorError, OutOfMemoryError, WorkerCrashedError)):
                self._drop(actor, err["error"])
        errors = self.errors.setdefault(task.name, [])
        errors.append(err)
        if task.attempt < self.max_attempts:
            self.on_retry(task, err)
            self.on_event(f"shard {task.name} attempt {task.attempt}/{self.max_attempts} failed "
                          f"({err['error']}); retrying")
            self.queue.append(ShardTask(task.source, task.name, task.attempt + 1))
        else:
            self.on_failure(task, errors)

    def run(self, tasks: list[ShardTask]) -> None:
        self.queue.extend(tasks)
        for _ in range(self.n_actors):
            self._spawn()
        next_tick = 0.0
        try:
            while self.queue or self.inflight:
                why = self.should_stop()
                if why:
                    raise JobAborted(why)
                self._poll_starting()
                self._check_progress_possible()
                self._dispatch()
                refs = list(self.inflight)
                if refs:
                    ready, _ = ray.wait(refs, num_returns=1, timeout=self.tick_seconds)
                    for ref in ready:
                        self._finished(ref)
                else:
                    time.sleep(min(self.tick_seconds, 0.2))
                if time.time() >= next_tick:
                    next_tick = time.time() + self.tick_seconds
                    self.on_tick(self._live())
        finally:
            self.shutdown()

    def _check_progress_possible(self) -> None:
        if self._ready() or self.inflight:
            self.no_ready_since = None
            return
        self.no_ready_since = self.no_ready_since or time.time()
        if time.time() - self.no_ready_since > self.start_timeout:
            raise JobAborted(f"no worker could start for {self.start_timeout:.0f} s "
                             "(does the cluster have the resources the workers ask for?)")

    def shutdown(self) -> None:
        """Stop every actor: in-flight attempts are abandoned, and what they wrote never
        becomes visible (their uploads are aborted now or by the next run's clean-up)."""
        for a in self.actors:
            try:
                ray.kill(a.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors.clear()

    def _live(self) -> dict:
        """Samples done so far in shards still in flight, keyed by shard name."""
        polls = {}
        for task, actor, _ in self.inflight.values():
            if actor.handle not in polls:
                polls[actor.handle] = actor.handle.progress.remote()
        out: dict = {}
        try:
            for p in ray.get(list(polls.values()), timeout=2):
                if p.get("extra", {}).get("shard"):
                    out[p["extra"]["shard"]] = p
        except (GetTimeoutError, RayError):
            pass
        return out
