"""Leases over an object store, for stores without conditional deletes or If-Match (Ceph
RGW honours neither; create-only PutObject it does honour).

A lease lives under a prefix as numbered records ``<prefix><epoch>.json``, each created with
a create-only write. The holder is the owner of the highest epoch while it has not expired
or been released. Taking over an expired lease means creating the next epoch, and exactly
one contender wins that write, so no delete race can hand one lease to two holders. A holder
renews by rewriting its own record. Before it acts, it checks that its deadline has not
passed and that no higher epoch exists (``check``). That time-bounded check is the fence
against a paused holder: after expiry plus a grace period it must not act, and a successor
may only start once that period is over.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from storage.objectstore import ObjectStore

Clock = Callable[[], float]


class LeaseHeld(Exception):
    """Someone else holds the lease; ``record`` says who and until when."""

    def __init__(self, record: "LeaseRecord"):
        self.record = record
        super().__init__(f"lease held by {record.owner} until {record.expires:.0f} (epoch {record.epoch})")


class LeaseLost(Exception):
    """This holder's lease expired or was taken over: it must not act on it any more."""


@dataclass(frozen=True)
class LeaseRecord:
    epoch: int
    owner: dict
    acquired: float
    expires: float
    released: bool = False

    def free(self, now: float, grace: float) -> bool:
        return self.released or now > self.expires + grace


def _key(prefix: str, epoch: int) -> str:
    return f"{prefix}{epoch:012d}.json"


def current(store: ObjectStore, prefix: str) -> LeaseRecord | None:
    """The highest-epoch record under ``prefix`` (one listing, one read)."""
    keys = [o.key for o in store.list(prefix) if o.key.endswith(".json")]
    if not keys:
        return None
    try:
        return LeaseRecord(**json.loads(store.get(max(keys))))
    except FileNotFoundError:
        return current(store, prefix)


@dataclass
class Lease:
    store: ObjectStore
    prefix: str
    record: LeaseRecord
    ttl: float
    clock: Clock = field(default=time.time, repr=False)

    @property
    def epoch(self) -> int:
        return self.record.epoch

    def remaining(self) -> float:
        return self.record.expires - self.clock()

    def check(self, margin: float = 0.0) -> None:
        """Raise LeaseLost unless this lease is still ours for at least ``margin`` seconds."""
        if self.remaining() < margin:
            raise LeaseLost(f"lease {self.prefix} epoch {self.epoch} expired")
        top = current(self.store, self.prefix)
        if top is None or top.epoch != self.epoch:
            raise LeaseLost(f"lease {self.prefix} epoch {self.epoch} was taken over")

    def renew(self) -> None:
        self.check()
        now = self.clock()
        self._write(LeaseRecord(self.epoch, self.record.owner, self.record.acquired, now + self.ttl))

    def release(self) -> None:
        """Give the lease up now, unless it already lapsed: then a successor may own it."""
        if self.remaining() > 0:
            self._write(LeaseRecord(self.epoch, self.record.owner, self.record.acquired,
                                    self.clock(), released=True))

    def _write(self, record: LeaseRecord) -> None:
        self.store.put(_key(self.prefix, self.epoch), json.dumps(asdict(record)).encode())
        self.record = record


def acquire(store: ObjectStore, prefix: str, owner: dict, ttl: float, *, grace: float = 0.0,
            clock: Clock = time.time, is_dead: Callable[[dict], bool] = lambda owner: False) -> Lease:
    """Take the lease, or raise LeaseHeld naming its live holder.

    A lease is free when released, when it expired more than ``grace`` seconds ago, or when
    ``is_dead`` can tell for sure that its owner is gone (e.g. a dead pid on this host)."""
    top = current(store, prefix)
    now = clock()
    if top is not None and not (top.free(now, grace) or is_dead(top.owner)):
        raise LeaseHeld(top)
    epoch = top.epoch + 1 if top else 1
    record = LeaseRecord(epoch, owner, now, now + ttl)
    if not store.put(_key(prefix, epoch), json.dumps(asdict(record)).encode(), if_absent=True):
        raise LeaseHeld(current(store, prefix) or record)
    lease = Lease(store, prefix, record, ttl, clock)
    newest = current(store, prefix)       # a contender that read an older listing
    if newest is not None and newest.epoch > epoch:
        raise LeaseHeld(newest)
    return lease
