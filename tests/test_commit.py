"""The commit protocol and the leases under it, on local storage and a real S3 endpoint:
create-only epochs, takeover after lapse, and a zombie attempt that wakes up late."""
from __future__ import annotations

import threading

import pytest

from storage import layout
from storage.commit import ClaimPolicy, ShardConflict, commit_shard
from storage.leases import LeaseHeld, LeaseLost, acquire, current
from storage.stores import open_store


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def store(store_url):
    return open_store(store_url)


def test_lease_is_exclusive_until_it_lapses(store):
    clock = Clock()
    a = acquire(store, "locks/x/", {"who": "a"}, ttl=10, clock=clock)
    with pytest.raises(LeaseHeld) as held:
        acquire(store, "locks/x/", {"who": "b"}, ttl=10, clock=clock)
    assert held.value.record.owner == {"who": "a"}
    clock.t += 5
    a.renew()                                    # renewed: lapses 10 s from now
    clock.t += 9
    with pytest.raises(LeaseHeld):
        acquire(store, "locks/x/", {"who": "b"}, ttl=10, clock=clock)
    clock.t += 2                                 # lapsed
    b = acquire(store, "locks/x/", {"who": "b"}, ttl=10, clock=clock)
    assert b.epoch == a.epoch + 1
    with pytest.raises(LeaseLost):               # a learns it lost the lease
        a.renew()
    b.release()
    c = acquire(store, "locks/x/", {"who": "c"}, ttl=10, clock=clock)   # released: free at once
    assert current(store, "locks/x/").owner == {"who": "c"} and c.epoch == 3


def test_dead_owner_frees_the_lease_at_once(store):
    clock = Clock()
    acquire(store, "locks/y/", {"pid": 1}, ttl=100, clock=clock)
    b = acquire(store, "locks/y/", {"pid": 2}, ttl=100, clock=clock, is_dead=lambda o: o["pid"] == 1)
    assert b.epoch == 2


def test_racing_contenders_get_one_winner(store):
    clock = Clock()
    wins, losses = [], []

    def contend(i):
        try:
            wins.append(acquire(store, "locks/race/", {"i": i}, ttl=60, clock=clock))
        except LeaseHeld:
            losses.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and len(losses) == 7


def _tar(store, name, payload: bytes):
    w = store.open_write(layout.shard_key(name))
    w.write(payload)
    return w


def test_commit_writes_tar_then_manifest_and_refuses_a_second_commit(store):
    policy = ClaimPolicy(ttl=60, grace=60, poll=1)
    assert commit_shard(store, "s1", _tar(store, "s1", b"tar-A"), b"part-A", {"a": 1}, policy)
    assert store.get(layout.shard_key("s1")) == b"tar-A"
    assert store.get(layout.manifest_key("s1")) == b"part-A"
    # a late attempt of the same shard finds it committed, and its tar never becomes visible
    assert not commit_shard(store, "s1", _tar(store, "s1", b"tar-B"), b"part-B", {"a": 2}, policy)
    assert store.get(layout.shard_key("s1")) == b"tar-A"
    assert store.get(layout.manifest_key("s1")) == b"part-A"


class Stalls:
    """A store whose first look for the manifest part (right after the claim is taken) sees
    it absent, then runs ``meanwhile``: what happens while the attempt is paused right there,
    the worst moment, between its last look and completing its tar."""

    def __init__(self, store, name, meanwhile):
        self._store, self._name, self._meanwhile, self._done = store, name, meanwhile, False

    def __getattr__(self, attr):
        return getattr(self._store, attr)

    def info(self, key):
        seen = self._store.info(key)
        if key == layout.manifest_key(self._name) and not self._done:
            self._done = True
            self._meanwhile()
        return seen


def test_a_zombie_that_wakes_after_its_claim_lapsed_cannot_commit(store):
    """Attempt A takes its claim, then stalls past ttl + grace (a paused process, a
    partitioned node). Attempt B takes over and commits. A wakes: its check fails, it aborts."""
    clock = Clock()
    policy = ClaimPolicy(ttl=60, grace=60, poll=5, clock=clock, sleep=clock.sleep)

    def b_commits():
        clock.t += 60 + 60 + 1
        assert commit_shard(store, "s2", _tar(store, "s2", b"tar-B"), b"part-B", {"a": "B"}, policy)

    tar_a = _tar(store, "s2", b"tar-A")
    with pytest.raises(ShardConflict):
        commit_shard(Stalls(store, "s2", b_commits), "s2", tar_a, b"part-A", {"a": "A"}, policy)
    assert store.get(layout.shard_key("s2")) == b"tar-B"
    assert store.get(layout.manifest_key("s2")) == b"part-B"


def test_a_waiting_attempt_takes_over_a_lapsed_claim(store):
    """A claim left by a crashed attempt (no manifest) is taken over after ttl + grace."""
    clock = Clock()
    policy = ClaimPolicy(ttl=60, grace=60, poll=5, clock=clock, sleep=clock.sleep)
    acquire(store, layout.claim_prefix("s3"), {"a": "crashed"}, 60, clock=clock)
    assert commit_shard(store, "s3", _tar(store, "s3", b"tar-B"), b"part-B", {"a": "B"}, policy)
    assert clock.t >= 1000 + 120
    assert store.get(layout.manifest_key("s3")) == b"part-B"
