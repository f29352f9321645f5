"""Resume planning from listings only: all shards minus the committed, minus the failed
unless retried. No shard or manifest part is read."""
from __future__ import annotations

from dataclasses import dataclass

from storage import layout
from storage.objectstore import ObjectStore


@dataclass(frozen=True)
class Plan:
    todo: list[str]          # input URLs to label now
    committed: list[str]     # names already committed
    failed: list[str]        # names that exhausted their attempts (skipped unless retried)
    total: int


def plan(output: ObjectStore, shards: list[str], *, retry_failed: bool = False) -> Plan:
    committed = layout.listed_names(output, layout.MANIFEST, ".parquet")
    failed = layout.listed_names(output, layout.FAILED, ".json") - committed
    skip = committed | (set() if retry_failed else failed)
    names = [(layout.shard_name(u), u) for u in shards]
    return Plan(
        todo=[u for n, u in names if n not in skip],
        committed=sorted(n for n, _ in names if n in committed),
        failed=sorted(n for n, _ in names if n in failed),
        total=len(shards),
    )
