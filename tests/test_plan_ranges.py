"""Listing in parallel key ranges (storage.listing, the ranged ``ObjectStore.list``) gives
exactly what one sequential listing gives, on every backend (local, moto, Ceph when set up).

Ranges and pages are forced small, so that a few hundred keys cross many range bounds and,
on S3, many pages of a range; the names are chosen to sort oddly around the bounds."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.plan import plan
from engine.status import status
from storage import layout, listing
from storage import s3 as s3_module
from storage.objectstore import is_s3
from storage.output import Output
from storage.s3_client import request_counts
from storage.stores import open_store

# Names that sort oddly: '-' < '.' < '/' < digits < letters < '_' < '~', a name that is a
# prefix of another ('x' of 'x-', of 'x.parquet'), unpadded numbers, a non-ASCII letter.
ODD = ["a", "a-", "a-b", "a.", "a.b", "a0", "a9", "aA", "a_b", "a~", "a+b", "a b", "A", "Z", "_", "-x",
       "0", "00", "9", "x", "x-", "x.parquet", "x_", "é", "ü-1", "shard_1", "shard.1", "shard-1-"]
NAMES = ODD + [f"shard-{i}" for i in range(150)]                    # what the caller expects
COMMITTED = [n for i, n in enumerate(NAMES) if i % 3] + ["zz-extra", "0-extra", "shard-1000", "a-c"]
FAILED = [n for i, n in enumerate(NAMES) if i % 3 == 0 and i % 2] + ["a", "shard-4", "failed-alone"]
NOISE = ["manifest/notes.txt", "manifest/deep/x.parquet", "manifest-old/a.parquet", "manifesz/a.parquet",
         "manifest.parquet", "failed/deep/x.json", "failed.json", "job.json", "shards/a.tar"]


@pytest.fixture
def store(store_url, monkeypatch):
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 5)   # a range (about 7 keys) spans pages
    store = open_store(store_url)
    objects = ([(layout.manifest_key(n), n.encode()) for n in COMMITTED] + [(layout.failed_key(n), b"{}") for n in FAILED]
               + [(key, b"noise") for key in NOISE])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put(*kv), objects))
    return store


@pytest.fixture
def small_ranges(monkeypatch):
    """About 7 expected keys a range, ranges on every backend (a local store lists once)."""
    monkeypatch.setattr(listing, "PER_RANGE", 7)
    monkeypatch.setattr(listing, "is_s3", lambda url: True)


def sequential(store, directory: str, suffix: str) -> frozenset[str]:
    names = (layout.name_from_key(o.key, directory, suffix) for o in store.list(directory))
    return frozenset(n for n in names if n)


def test_split_covers_the_key_space_with_bounds_taken_from_the_keys(monkeypatch):
    keys = [f"k{i:03d}" for i in range(100)]
    monkeypatch.setattr(listing, "PER_RANGE", 10)
    ranges = listing.split(reversed(keys + keys[:5]))                   # any order, duplicates
    assert len(ranges) == 10 and ranges[0][0] is None and ranges[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))       # consecutive, no gap
    assert [r[1] for r in ranges[:-1]] == keys[10::10]
    monkeypatch.setattr(listing, "MOST_RANGES", 4)
    assert len(listing.split(keys)) == 4
    assert listing.split(keys[:19]) == [(None, None)]                    # under two ranges' worth
    assert listing.split([]) == [(None, None)]


def test_a_ranged_list_is_the_full_list_filtered(store, monkeypatch):
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 40)    # still several pages of the ~270 keys
    full = list(store.list())
    keys = [o.key for o in full]
    bounds = [None, keys[0], keys[7], "manifest/", "manifest/a-.parquet", "manifest/shard-5",
              "manifest/zzz", "~", keys[-1]]
    for start in bounds:
        for stop in bounds:
            for prefix in ("", "manifest/"):
                want = [o for o in full if o.key.startswith(prefix)
                        and (start is None or o.key > start) and (stop is None or o.key <= stop)]
                assert list(store.list(prefix, start_after=start, stop_after=stop)) == want, (prefix, start, stop)


def test_parallel_ranges_give_the_sequential_listing(store, monkeypatch):
    expected = [layout.manifest_key(n) for n in NAMES] + ["manifest/absent-1.parquet", "manifest/~"]
    whole = list(store.list(layout.MANIFEST))
    for per_range in (1, 2, 3, 7, 50):
        monkeypatch.setattr(listing, "PER_RANGE", per_range)
        ranges = listing.split(expected)
        assert len(ranges) == min(listing.MOST_RANGES, len(set(expected)) // per_range)
        assert listing.list_ranges(store, layout.MANIFEST, ranges) == whole, per_range


@pytest.mark.parametrize("forced", [False, True])
def test_output_states_with_names_are_the_sequential_states(store, monkeypatch, forced):
    if forced:
        monkeypatch.setattr(listing, "PER_RANGE", 7)
        monkeypatch.setattr(listing, "is_s3", lambda url: True)
    calls = []
    original = type(store).list

    def spy(self, prefix="", **bounds):
        calls.append((prefix, bounds.get("start_after"), bounds.get("stop_after")))
        return original(self, prefix, **bounds)

    monkeypatch.setattr(type(store), "list", spy)
    out = Output(store)
    committed = sequential(store, layout.MANIFEST, ".parquet")
    failed = sequential(store, layout.FAILED, ".json") - committed
    assert committed == set(COMMITTED) and failed == set(FAILED) - set(COMMITTED)
    calls.clear()
    for names in (NAMES, reversed(NAMES), NAMES[:5], [], ["absent"] * 40, COMMITTED + FAILED):
        states = out.states(names)
        assert states.committed == committed and states.failed == failed
        assert out.committed(NAMES) == committed
    ranged = [c for c in calls if c[1] is not None or c[2] is not None]
    assert bool(ranged) == forced             # unforced, 180 names are one listing everywhere
    if forced:
        assert len({c[1] for c in ranged if c[0] == layout.MANIFEST}) >= len(NAMES) // 7 - 1
    names = NAMES + ["new-1", "new-2"]
    assert out.pending(names) == [n for n in names if n not in committed and n not in failed]
    counts = out.counts(names)
    assert (counts.committed, counts.failed) == (len(set(names) & committed), len(set(names) & failed))


def test_plan_and_status_match_the_sequential_listing(store, small_ranges):
    inputs = [f"s3://raw/{n}.tar" for n in NAMES] + ["s3://raw/new.tar"]
    store.put(layout.JOB, json.dumps({"shards": inputs}).encode())
    committed = set(COMMITTED) & set(NAMES)
    failed = (set(FAILED) - set(COMMITTED)) & set(NAMES)
    p = plan(store, inputs)
    assert p.committed == sorted(committed) and p.failed == sorted(failed) and p.total == len(inputs)
    assert p.todo == [u for u in inputs if layout.shard_name(u) not in committed | failed]
    again = plan(store, inputs, retry_failed=True)
    assert again.todo == [u for u in inputs if layout.shard_name(u) not in committed]
    s = status(store)
    assert (s["total"], s["committed"], s["failed"]) == (len(inputs), len(committed), len(failed))
    assert s["failed_shards"] == sorted(failed)


def test_an_s3_range_stops_paginating_past_its_end(store):
    if not is_s3(store.url):
        pytest.skip("a local listing is one directory read")
    first = next(iter(store.list(layout.MANIFEST))).key
    before = request_counts().get("ListObjectsV2", 0)
    assert [o.key for o in store.list(layout.MANIFEST, stop_after=first)] == [first]
    assert request_counts().get("ListObjectsV2", 0) - before == 1               # not all ~60 pages


def test_the_collector_is_paused_for_a_listing_and_back_on_after(tmp_path):
    """Paused while the listing runs (its objects hold no cycles), on again after, also when the
    listing fails, and left off if it was off."""
    import gc

    class Store:
        url = str(tmp_path)

        def __init__(self, fail: bool):
            self.fail, self.seen = fail, []

        def list(self, prefix):
            self.seen.append(gc.isenabled())
            if self.fail:
                raise OSError("listing failed")
            yield from ()

    assert gc.isenabled()
    ok, bad = Store(False), Store(True)
    listing.list_expecting(ok, "manifest/", None)
    with pytest.raises(OSError):
        listing.list_expecting(bad, "manifest/", None)
    assert ok.seen == bad.seen == [False] and gc.isenabled()
    gc.disable()
    try:
        listing.list_expecting(ok, "manifest/", None)
        assert not gc.isenabled()
    finally:
        gc.enable()
