"""What keeps the trainer fed: each dataset read by DataLoader workers, epoch after epoch, in an
order that a resumed run reproduces exactly, and the split checked before any rank waits on another.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import torch

from pipelines.student.errors import TrainSetupError
from pipelines.student.loader import DepthShards


def check_split(dataset: DepthShards, what: str) -> None:
    """Refuse a split that leaves a rank without a shard: DDP would wait forever at its first
    all-reduce for a rank with nothing to read. Each rank decides alone (the split is
    deterministic, and a rank's shard count is the same every epoch), so all raise the same."""
    n, world = len(dataset.plans), dataset.world_size
    if n < world:
        raise TrainSetupError(f"train-student: {world} rank{'s' if world > 1 else ''} but the {what} OUTPUTs hold "
                              f"{n} shard{'' if n == 1 else 's'} with samples to train on: every rank needs at "
                              "least one (use fewer ranks or more shards)")


def in_order(samples: Iterable[dict], start: list[int], total: list[int]) -> Iterator[dict]:
    """DataLoader samples in the order an uninterrupted DataLoader yields them: sample i of every
    worker before sample i + 1 of any (round-robin; a worker that is done is skipped).

    `start[w]` samples of worker w were consumed before, `total[w]` is all it holds this epoch.
    A resumed DataLoader restarts its round-robin at worker 0, whoever was next; this puts each
    sample back in its place, holding about one sample per worker while it waits.
    """
    samples = iter(samples)
    waiting: list[deque] = [deque() for _ in start]
    for i in range(min(start, default=0), max(total, default=0)):
        for w, (first, end) in enumerate(zip(start, total)):
            if first <= i < end:
                while not waiting[w]:
                    sample = next(samples)
                    waiting[sample["worker"]].append(sample)
                yield waiting[w].popleft()


class Stream:
    """Endless samples of one rank's share of a dataset, read by `workers` DataLoader processes
    (0: in the trainer's process), each epoch by a fresh DataLoader after `set_epoch`.

    The trainer marks what it consumed on `dataset` (`mark_consumed`) and saves its `state_dict`;
    a Stream made with that state yields exactly the rest, in the same order (`in_order`).
    """

    def __init__(self, dataset: DepthShards, name: str, *, workers: int, per_batch: int, pin_memory: bool,
                 state: dict | None = None):
        self.dataset = dataset
        self.workers = min(workers, len(dataset.shards()))  # a worker without a shard would idle
        readers = max(1, self.workers)
        if state:
            if state.get("num_workers") not in (None, readers):
                raise TrainSetupError(f"train-student: the checkpoint's {name} data was read by {state['num_workers']} "
                                      f"DataLoader workers per rank, this run reads it with {readers}: resume with "
                                      "the same --loader-workers")
            try:
                dataset.load_state_dict(state)
            except ValueError as e:
                raise TrainSetupError(f"train-student: the checkpoint's {name} data: {e}") from None
        # Two micro-batches' worth of samples in flight across the workers.
        self.loader_args = dict(batch_size=None, num_workers=self.workers, pin_memory=pin_memory,
                                persistent_workers=False,
                                prefetch_factor=max(2, -(-2 * per_batch // self.workers)) if self.workers else None)

    def __iter__(self) -> Iterator[dict]:
        data, readers = self.dataset, max(1, self.workers)
        while True:
            done = data.state_dict()["consumed"]
            start = [done.get(str(w), 0) for w in range(readers)]
            total = [sum(p.count for p in data.shards(w, readers)) for w in range(readers)]
            yield from in_order(torch.utils.data.DataLoader(data, **self.loader_args), start, total)
            data.set_epoch(data.epoch + 1)
