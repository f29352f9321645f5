"""What this process holds open in an OUTPUT, so that a process told to stop can let go of it
at once instead of leaving it to time out.

A killed process (SIGKILL, a lost node) leaves its upload behind until the next job start's
``abort_incomplete``, and its shard claim held until the claim lapses (ttl + grace: minutes,
during which a retry of the shard waits). A process that is *told* to stop (SIGTERM: a spot
notice, a pod eviction) can do better: the shard sink tracks its upload, the commit tracks
its claim, and ``abandon`` aborts every upload and releases every claim, so the retry takes
the claim at once. The signal itself is the runtime's business (engine.runtime.preemption).

The fence. Releasing a claim is safe only if no write made under it can still land: a tar
completed, or a manifest part written, after a successor's commit would leave a part that
disagrees with its tar. So the commit's steps (renew, complete the tar, renew, write the
part) run inside ``step()``, and ``abandon`` takes the same lock: it waits for a step in
flight (a few requests), and once it has run no step starts (Preempted). A step that
outlasts ``timeout`` keeps the claims held (they lapse: slow, but safe); the uploads are
aborted anyway. The caller must not resume the interrupted work afterwards: it exits.

Weak references: an entry goes when its object goes, and abandoning what already finished
is a no-op (a committed writer's abort, a released claim's release).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from storage.leases import Lease
from storage.objectstore import ObjectWriter

_lock = threading.RLock()      # the registry; re-entrant: a handler may interrupt its holder
_fence = threading.RLock()     # a commit step in flight
_uploads: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_claims: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_stopping = False


class Preempted(RuntimeError):
    """This process was told to stop: its shard is left to a retry, nothing of it committed."""


def track(upload: ObjectWriter) -> ObjectWriter:
    """Register an upload that ``abandon`` aborts; returns it."""
    with _lock:
        _uploads[id(upload)] = upload
    return upload


def hold(claim: Lease) -> Lease:
    """Register a shard claim that ``abandon`` releases; returns it. Taken while the process
    is stopping, it is given back at once (Preempted)."""
    with _lock:
        _claims[id(claim)] = claim
        stopping = _stopping
    if stopping:
        claim.release()
        raise Preempted(f"claim {claim.prefix}: this process is stopping")
    return claim


@contextmanager
def step() -> Iterator[None]:
    """One commit step: ``abandon`` waits for it to end, and none starts once it has run."""
    with _fence:
        if _stopping:
            raise Preempted("this process is stopping: its commit was not made")
        yield


def abandon(timeout: float = 10.0) -> tuple[int, int]:
    """Abort every tracked upload and release every live claim; returns how many of each.
    Waits up to ``timeout`` seconds for a commit step in flight before touching claims."""
    global _stopping
    fenced = _fence.acquire(timeout=timeout)
    try:
        with _lock:
            _stopping = True
            uploads, claims = list(_uploads.values()), list(_claims.values())
        aborted = released = 0
        for upload in uploads:
            with suppress(Exception):    # one that fails is cleaned by the next job start
                upload.abort()
                aborted += 1
        for claim in claims if fenced else ():
            if claim.record.released or claim.remaining() <= 0:
                continue
            with suppress(Exception):    # one that fails lapses
                claim.release()
                released += 1
        return aborted, released
    finally:
        if fenced:
            _fence.release()
