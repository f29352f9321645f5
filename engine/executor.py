"""Shards to actors, dynamically: each actor holds at most two shards (one running, one
queued so it never idles between shards); a faster actor simply comes back sooner.

A failed attempt (exception, dead actor) is retried on another actor until
``max_attempts``; a dead actor is replaced. The caller decides what a result or a
permanent failure means (commit counters, failed/ markers): this loop only schedules.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from pipelines.pseudo_label import ShardResult, ShardTask

PER_ACTOR = 2


@dataclass
class Attempts:
    errors: list[dict] = field(default_factory=list)


def describe(exc: BaseException) -> str:
    """One line for the failure of an attempt (the remote traceback stays in the logs)."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    if isinstance(exc, RayActorError):
        return f"worker died: {str(exc).strip().splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"


def run_shards(
    tasks: list[ShardTask],
    new_actor: Callable[[], "ray.actor.ActorHandle"],
    n_actors: int,
    *,
    max_attempts: int,
    on_result: Callable[[ShardResult], None],
    on_failure: Callable[[ShardTask, list[dict]], None],
    on_tick: Callable[[dict], None] = lambda live: None,
    tick_seconds: float = 1.0,
) -> None:
    queue = deque(tasks)
    attempts: dict[str, Attempts] = {}
    actors = [new_actor() for _ in range(n_actors)]
    load: dict = {a: 0 for a in actors}
    inflight: dict = {}                     # ObjectRef -> (task, actor, started)
    next_tick = 0.0

    def submit(actor) -> None:
        while queue and load[actor] < PER_ACTOR:
            task = queue.popleft()
            inflight[actor.label.remote(task)] = (task, actor, time.time())
            load[actor] += 1

    for a in actors:
        submit(a)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_seconds)
        for ref in ready:
            task, actor, started = inflight.pop(ref)
            load[actor] = load.get(actor, 1) - 1
            try:
                on_result(ray.get(ref))
            except (RayTaskError, RayActorError) as exc:
                err = {"attempt": task.attempt, "error": describe(exc), "started": started,
                       "ended": time.time()}
                record = attempts.setdefault(task.name, Attempts())
                record.errors.append(err)
                if isinstance(exc, RayActorError) and actor in load:
                    _replace(actor, actors, load, new_actor)
                if task.attempt < max_attempts:
                    queue.append(ShardTask(task.source, task.name, task.attempt + 1))
                else:
                    on_failure(task, record.errors)
            for a in list(load):
                submit(a)
        if time.time() >= next_tick:
            next_tick = time.time() + tick_seconds
            on_tick(_live(inflight))


def _replace(dead, actors, load, new_actor) -> None:
    load.pop(dead, None)
    if dead in actors:
        actors.remove(dead)
    fresh = new_actor()
    actors.append(fresh)
    load[fresh] = 0


def _live(inflight: dict) -> dict:
    """Samples done so far in shards still in flight, keyed by shard name."""
    out: dict = {}
    polls = {}
    for task, actor, _ in inflight.values():
        if actor not in polls:
            polls[actor] = actor.progress.remote()
    try:
        for p in ray.get(list(polls.values()), timeout=2):
            shard = p.get("extra", {}).get("shard")
            if shard:
                out[shard] = p
    except (GetTimeoutError, RayActorError, RayTaskError):
        pass
    return out
