"""The plumbing that keeps a model busy within a memory bound: a prefetching ordered map, a
bucketer that forms same-size batches without waiting forever, a pixel budget, an ordered sink."""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from typing import Callable, Hashable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor, depth: int) -> Iterator[R]:
    """``map(fn, items)`` in order, with reading ``items`` and up to ``depth`` calls of
    ``fn`` running ahead in the background. An exception from ``items`` or ``fn``
    surfaces in the consumer at the position it happened; stopping early stops the reader."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(pool.submit(fn, item)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    reader = threading.Thread(target=produce, name="prefetch", daemon=True)
    reader.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x.result()
    finally:
        stop.set()
        reader.join(timeout=5)


class Bucketer:
    """Groups items by a key (the teacher's input size) into batches of ``batch_size``.

    At most ``max_pending`` items wait: past that, the fullest bucket goes out even if
    it is short, so memory stays bounded however many sizes a shard mixes. With ``cost``
    (an item's decoded pixels) the same holds by pixels: a batch never passes
    ``max_batch_cost`` unless one item alone does, and what waits never passes
    ``max_pending_cost``, so a batch of large images never holds N times the largest."""

    def __init__(self, batch_size: int, key: Callable[[T], Hashable], max_pending: int | None = None,
                 cost: Callable[[T], int] = lambda item: 0, max_batch_cost: float = float("inf"),
                 max_pending_cost: float = float("inf")):
        self.batch_size = batch_size
        self.key = key
        self.max_pending = max(batch_size, max_pending or 4 * batch_size)
        self.cost, self.max_batch_cost, self.max_pending_cost = cost, max_batch_cost, max_pending_cost
        self._buckets: OrderedDict[Hashable, list] = OrderedDict()
        self._costs: dict[Hashable, int] = {}
        self._pending = 0
        self._pending_cost = 0

    def add(self, item: T) -> list[list[T]]:
        k, c = self.key(item), self.cost(item)
        ready = []
        if self._buckets.get(k) and self._costs[k] + c > self.max_batch_cost:
            ready.append(self._take(k))
        self._buckets.setdefault(k, []).append(item)
        self._costs[k] = self._costs.get(k, 0) + c
        self._pending += 1
        self._pending_cost += c
        if len(self._buckets[k]) >= self.batch_size or self._costs[k] >= self.max_batch_cost:
            ready.append(self._take(k))
        while self._pending > self.max_pending or self._pending_cost > self.max_pending_cost:
            ready.append(self._take(max(self._buckets, key=lambda b: (self._costs[b], len(self._buckets[b])))))
        return ready

    def flush(self) -> list[list[T]]:
        return [self._take(k) for k in list(self._buckets)]

    def _take(self, k: Hashable) -> list[T]:
        batch = self._buckets.pop(k)
        self._pending -= len(batch)
        self._pending_cost -= self._costs.pop(k)
        return batch


class PixelBudget:
    """A counting semaphore over decoded pixels: what a worker may hold at once.

    Acquired in tar order by the reader before an image is decoded, released once the sample's
    arrays are freed (after encoding). No deadlock: one acquire takes at most half the capacity
    and the Bucketer keeps at most half waiting (``max_pending_cost``), so once the stages
    downstream drain, the next image always fits. ``close`` wakes a reader blocked here when
    the shard stops."""

    def __init__(self, capacity: int):
        self.capacity = max(2, int(capacity))
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, pixels: int) -> int:
        """Block until ``pixels`` (capped at half the capacity) fit; returns what was taken."""
        amount = min(int(pixels), self.capacity // 2)
        with self._cond:
            while self.used + amount > self.capacity and not self._closed:
                self._cond.wait(timeout=0.5)
            if self._closed:
                raise RuntimeError("pixel budget closed: the shard stopped")
            self.used += amount
            self.peak = max(self.peak, self.used)
        return amount

    def release(self, amount: int) -> None:
        if amount:
            with self._cond:
                self.used -= amount
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class OrderedSink:
    """Consumes futures in submission order on its own thread (the shard writer), so
    upload and tar writing overlap the model. ``put`` re-raises the sink's failure."""

    def __init__(self, consume: Callable[[object], None], depth: int):
        self._consume = consume
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fut = self._q.get()
            if fut is _END:
                return
            if self._error is not None:
                continue  # drain so producers never block
            try:
                self._consume(fut.result())
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer
                self._error = e

    def put(self, fut: Future) -> None:
        self._check()
        self._q.put(fut)

    def close(self) -> None:
        """Wait until everything put was consumed; raise the first failure."""
        self._q.put(_END)
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        self._error = self._error or RuntimeError("abandoned")
        self._q.put(_END)
        self._thread.join(timeout=5)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
