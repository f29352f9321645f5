"""One directory listed as parallel key ranges, with exactly the result of one listing.

S3 lists at most 1,000 keys a request, each page after the one before: 100,000 committed
shards are 100 round trips in a row. A caller that knows which keys to expect (planning knows
its inputs) can cut the key space at some of them, sorted as S3 sorts, and list the pieces at
once. The pieces cover the whole key space, from the prefix's start to its end, so an object
whose key was not expected is found all the same. A local directory is read whole by any
listing, so there the pieces would only repeat the work: it is listed once.

A listing of 100,000 keys makes some 600,000 small objects (dicts, strings, records), none in
a reference cycle, and Python's cyclic collector, triggered by allocations, walks the heap again
and again while they are made: in a driver that has imported torch, about half of planning's
CPU. The collector is paused while a listing runs (reference counting still frees everything).
"""
from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterable, Iterator

from storage.objectstore import ObjectInfo, ObjectStore, is_s3

PER_RANGE = 2_000    # expected keys per range: fewer than twice this, and it is one listing
MOST_RANGES = 16     # listed at once (Ceph RGW on 2 cores: 4-16 alike, 32 slower)

# (start_after, stop_after): the keys k with start_after < k <= stop_after; None is unbounded.
Range = tuple[str | None, str | None]


def split(keys: Iterable[str]) -> list[Range]:
    """Consecutive ranges that together cover every key: about PER_RANGE of ``keys`` in each,
    at most MOST_RANGES, each bound one of ``keys``. Sorted as Python sorts str, which is by
    code point, which is UTF-8 byte order: the order S3 lists in."""
    keys = sorted(set(keys))
    n = min(MOST_RANGES, len(keys) // PER_RANGE)
    if n < 2:
        return [(None, None)]
    bounds = [keys[len(keys) * i // n] for i in range(1, n)]
    return list(zip([None, *bounds], [*bounds, None]))


def list_ranges(store: ObjectStore, prefix: str, ranges: list[Range]) -> list[ObjectInfo]:
    """The objects under ``prefix`` in ``ranges`` (consecutive), in key order, listed at once."""
    def one(r: Range) -> list[ObjectInfo]:
        return list(store.list(prefix, start_after=r[0], stop_after=r[1]))

    if len(ranges) == 1:
        return one(ranges[0])
    with ThreadPoolExecutor(min(len(ranges), MOST_RANGES)) as pool:
        return [o for part in pool.map(one, ranges) for o in part]


def list_expecting(store: ObjectStore, prefix: str, expected: Iterable[str] | None) -> list[ObjectInfo]:
    """What ``store.list(prefix)`` gives, object for object. ``expected`` (keys, some perhaps
    absent) only decides where an S3 listing is cut into ranges; None lists once."""
    with collector_paused():
        if expected is None or not is_s3(store.url):
            return list(store.list(prefix))
        return list_ranges(store, prefix, split(expected))


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and back on after if it was on (two
    listings at once: whichever saw it on turns it back on)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
