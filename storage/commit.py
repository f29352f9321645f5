"""The shard commit: make the tar visible, then write its manifest part, fenced so that
no two attempts can leave a manifest part that disagrees with its tar.

Attempts of one shard (a retry, a resumed job, a zombie that outlived its actor) all
write the same ``shards/<name>.tar``. Whoever completes that object last wins it, so an
attempt completes its tar only while it holds the shard's claim: a lease in
``locks/shards/<name>/``, taken just before the tar is completed and held until the
manifest part is written.
1. Take the claim. If another live attempt holds it, wait until it is released or lapses.
   If the manifest part shows up meanwhile, the shard is already committed.
2. If the manifest part already exists, abort: the shard was committed by someone else.
3. Renew the claim (which fails if it lapsed or was taken over), complete the tar.
4. Renew again, write the manifest part create-only: the commit record.
5. Release the claim.
A claim lapses ``ttl`` after its last renewal, and a successor may take it only ``grace``
later. A holder that lapsed (paused, partitioned) fails its renewal and aborts. So the only
unsafe case is one write (with its retries) that outlasts ``ttl + grace`` after the
renewal before it. A process told to stop (SIGTERM) releases its claim at once, but only
after steps 3-4 in flight have ended, and none starts after (storage.inflight).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from storage import inflight, layout
from storage.leases import LeaseHeld, LeaseLost, acquire
from storage.manifest import tars_of
from storage.objectstore import ObjectStore, ObjectWriter


class ShardConflict(RuntimeError):
    """Another attempt's commit interfered with this one; this attempt wrote nothing visible."""


@dataclass(frozen=True)
class ClaimPolicy:
    ttl: float = 60.0           # a holder must finish its commit within this
    grace: float = 60.0         # a lapsed claim may be taken over only this much later
    poll: float = 2.0
    clock: Callable[[], float] = field(default=time.time, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def of(cls, seconds: float) -> "ClaimPolicy":
        """ttl = grace = seconds."""
        return cls(ttl=seconds, grace=seconds, poll=min(2.0, seconds / 4))


def commit_shard(output: ObjectStore, name: str, tar: ObjectWriter, part: bytes, owner: dict,
                 policy: ClaimPolicy = ClaimPolicy(), *, replaces: str | None = None) -> bool:
    """Complete ``tar`` and write the manifest part ``part``. Returns False (and aborts the
    tar) when the shard turned out to be committed already by another attempt.

    ``replaces`` (a repair): the shard is committed, its part's rows name that tar, and ``tar``
    is a new generation under another key. The same claim fences it: the part is overwritten
    (one atomic PUT) only if it still names ``replaces``, so of two attempts at one repair the
    second finds the first's generation and aborts. The superseded tar is the caller's to
    remove, once this returned True."""
    manifest = layout.manifest_key(name)
    claim = _take_claim(output, name, owner, policy, wait_out=replaces is None)
    if claim is None or not _still_expected(output, manifest, replaces):
        tar.abort()
        if claim is not None:
            claim.release()
        return False
    try:
        with inflight.step():             # a stopping process waits for this, or it never starts
            claim.renew()                 # checks it is still ours, then a full ttl for the write
            tar.commit()
            claim.renew()
            if not output.put(manifest, part, if_absent=replaces is None):
                raise ShardConflict(f"shard {name}: a manifest part appeared while this attempt held the claim")
    except LeaseLost as e:
        tar.abort()
        raise ShardConflict(f"shard {name}: {e}; this attempt's output was not committed") from None
    claim.release()
    return True


def _still_expected(output, manifest: str, replaces: str | None) -> bool:
    """First commit: no part yet. Replacement: the part's rows still name ``replaces``."""
    if replaces is None:
        return output.info(manifest) is None
    try:
        shards = tars_of(output.get(manifest))
    except FileNotFoundError:
        return False            # requeued meanwhile: a label run relabels the shard whole
    return shards <= {replaces}


def _take_claim(output, name, owner, policy, wait_out=True):
    """The shard's claim, waiting while another attempt holds it. ``wait_out``: stop waiting
    (None) once the shard is committed, which for a first commit means someone else did it."""
    deadline = policy.clock() + policy.ttl + policy.grace + 10 * policy.poll
    while True:
        try:
            return inflight.hold(acquire(output, layout.claim_prefix(name), owner, policy.ttl,
                                         grace=policy.grace, clock=policy.clock))
        except LeaseHeld:
            if wait_out and output.info(layout.manifest_key(name)) is not None:
                return None
            if policy.clock() > deadline:
                raise ShardConflict(f"shard {name}: its claim stayed held for longer than its lease")
            policy.sleep(policy.poll)
