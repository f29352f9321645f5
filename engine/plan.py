"""Resume planning from listings only: all shards minus the committed, minus the failed
unless retried. No shard or manifest part is read; the input names cut a large S3 listing into
parallel ranges (storage.listing)."""
from __future__ import annotations

from dataclasses import dataclass

from storage import layout
from storage.objectstore import ObjectStore
from storage.output import Output


@dataclass(frozen=True)
class Plan:
    todo: list[str]          # input URLs to label now
    committed: list[str]     # names already committed
    failed: list[str]        # names that exhausted their attempts (skipped unless retried)
    total: int


def plan(output: ObjectStore, shards: list[str], *, retry_failed: bool = False) -> Plan:
    names = [(layout.shard_name(u), u) for u in shards]
    states = Output(output).states(n for n, _ in names)   # the names let S3 list in parallel ranges
    pending = set(states.pending(n for n, _ in names))
    return Plan(
        todo=[u for n, u in names if n in pending or (retry_failed and n in states.failed)],
        committed=sorted(n for n, _ in names if n in states.committed),
        failed=sorted(n for n, _ in names if n in states.failed),
        total=len(shards),
    )
