"""Repair one committed shard: relabel its error rows, keep everything else byte for byte, and
commit the result as the shard's next generation.

    current part -> targets (error rows, reason matched) -> input shard: label the targets only
                 -> new tar, in the part's row order: labeled targets + the other samples' members
                    copied from the current tar (ranged reads at the recorded offsets, sha256 checked)
                 -> fenced replacement of the part (storage.commit) -> the superseded tar removed

A crash before the replacement leaves the current generation whole and referenced (the new tar,
if complete, is an unreferenced object a rerun overwrites or removes); after it, the new one. Only
then is the old tar deleted. A member that no longer matches its recorded sha256 stops the repair
of that shard: copying it would carry bit rot into a generation that looks freshly made.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from pipelines.decode import SampleLimits
from pipelines.encode import Encoded
from pipelines.pseudo_label import (
    Labelers,
    ShardResult,
    finish_result,
    label_samples,
    owner,
)
from pipelines.tasks import Progress, ShardTask
from storage import layout
from storage.commit import ClaimPolicy
from storage.manifest import decode_part
from storage.objectstore import ObjectNotFound, ObjectStore
from storage.output import Output
from storage.shards import UngroupedKeys
from storage.sink import ShardSink

COPY_SPAN = 64 * 2**20     # the most bytes one ranged read copies from the current tar


class RepairError(RuntimeError):
    """The shard cannot be repaired as it stands (its current tar disagrees with its part)."""


@dataclass
class RepairResult(ShardResult):
    targets: int = 0           # error rows chosen for relabeling
    repaired: int = 0          # of them, ok now
    missing: int = 0           # of them, no longer in the input shard: their rows are kept as they were
    generation: int = 0        # the generation committed (0: nothing was committed)
    copied_bytes: int = 0      # member bytes carried over from the previous generation


def targets_of(rows: list[dict], reason: re.Pattern | None) -> set[str]:
    """The keys of the error rows to relabel: all of them, or those whose error ``reason`` finds."""
    return {r["key"] for r in rows
            if r["status"] != "ok" and (reason is None or reason.search(r.get("error") or ""))}


def repair_shard(task: ShardTask, labelers: Labelers, output: ObjectStore, *, reason: re.Pattern | None = None,
                 batch_size: int = 8, threads: int = 4, worker: str = "", progress: Progress | None = None,
                 claim: ClaimPolicy = ClaimPolicy(), limits: SampleLimits = SampleLimits()) -> RepairResult:
    """Repair shard ``task.name`` of ``output`` from input shard ``task.source``. ``committed``
    False: nothing to repair (no matching error row, or the shard is no longer committed), or
    another attempt replaced the generation first."""
    t_start = time.perf_counter()
    progress = progress or Progress()
    result = RepairResult(task.name, task.source, worker=worker, attempt=task.attempt, committed=False)
    try:
        rows = decode_part(output.get(layout.manifest_key(task.name))).to_pylist()
    except ObjectNotFound:
        return result              # requeued meanwhile: a label run relabels it whole
    targets = targets_of(rows, reason)
    result.targets = len(targets)
    if not targets:
        return result
    current = _current_shard(task.name, rows)
    _, generation = layout.parse_shard_file(current)
    view = Output(output)
    old_tar = view.tar_key(current)

    def write(ungrouped) -> tuple[ShardSink, bool]:
        with ShardSink(output, task.name, generation=generation + 1) as shard:
            merge = _Merge(rows, targets, shard, _Copier(output, old_tar), result)
            label_samples(task.source, labelers, merge.labeled, result=result, progress=progress,
                          wanted=targets.__contains__, batch_size=batch_size, threads=threads, limits=limits,
                          ungrouped=ungrouped)
            merge.finish()
            return shard, shard.commit({"source_kind": labelers.source_kind, "worker": worker,
                                        "attempt": task.attempt},
                                       owner=owner(worker, task.attempt), claim=claim, replaces=current)

    try:
        shard, committed = write(())
    except UngroupedKeys as e:         # still not grouped in the input: those keys stay error rows
        result.repaired = result.missing = result.copied_bytes = 0
        shard, committed = write(e.keys)
    if committed:
        output.delete(old_tar)         # only now: until the part named the new tar, it was the shard
        result.committed, result.generation = True, generation + 1
    result.tar_size = shard.tar_size
    return finish_result(result, shard.rows, t_start)


def _current_shard(name: str, rows: list[dict]) -> str:
    shards = {r["shard"] for r in rows}
    if len(shards) != 1 or layout.parse_shard_file(next(iter(shards)))[0] != name:
        raise RepairError(f"shard {name}: its manifest part names {sorted(shards)}, not one tar of this shard; "
                          "run verify")
    return shards.pop()


class _Merge:
    """The new tar in the part's row order. Labeled targets arrive in input order; a row is
    written once every row before it is: copied (not a target), labeled, or, at the end, kept
    as it was (a target the input no longer has)."""

    def __init__(self, rows, targets, shard: ShardSink, copier: _Copier, result: RepairResult):
        self.rows, self.targets, self.shard, self.copier, self.result = rows, targets, shard, copier, result
        self.labeled_rows: dict[str, Encoded] = {}
        self.next = 0

    def labeled(self, enc: Encoded) -> None:
        if enc.key in self.targets:
            self.labeled_rows[enc.key] = enc
        self._flush(final=False)

    def finish(self) -> None:
        self._flush(final=True)
        self.result.copied_bytes = self.copier.bytes

    def _flush(self, final: bool) -> None:
        run: list[dict] = []           # consecutive rows to copy, in one go
        while self.next < len(self.rows):
            row = self.rows[self.next]
            key = row["key"]
            if key in self.targets and key not in self.labeled_rows and not final:
                break                  # its label has not come yet
            if key in self.targets and key in self.labeled_rows:
                self._copy(run)
                run = []
                enc = self.labeled_rows.pop(key)
                self.shard.add(enc.key, enc.members, enc.row)
                self.result.repaired += enc.row["status"] == "ok"
            else:
                if key in self.targets:
                    self.result.missing += 1
                run.append(row)
            self.next += 1
        self._copy(run)

    def _copy(self, rows: list[dict]) -> None:
        for row, members in self.copier.copy(rows):
            self.shard.add(row["key"], members, {k: v for k, v in row.items() if k != "members"})


class _Copier:
    """Members of the current tar by ranged reads: consecutive samples share one read of at most
    COPY_SPAN bytes; each member's sha256 is checked against its row."""

    def __init__(self, store: ObjectStore, tar: str):
        self.store, self.tar, self.bytes = store, tar, 0

    def copy(self, rows: list[dict]):
        """(row, {ext: bytes}) for each row, in order; an error row has no members."""
        span: list[dict] = []
        for row in rows:
            members = _members([row])
            if members and _members(span) and _end(members) - _start(_members(span)) > COPY_SPAN:
                yield from self._read(span)
                span = []
            span.append(row)
        yield from self._read(span)

    def _read(self, rows: list[dict]):
        members = _members(rows)
        start = _start(members) if members else 0
        data = self.store.read_range(self.tar, start, _end(members) - start) if members else b""
        for row in rows:
            members = {}
            for m in row.get("members") or []:
                blob = data[m["offset"] - start: m["offset"] - start + m["size"]]
                if len(blob) != m["size"] or hashlib.sha256(blob).hexdigest() != m["sha256"]:
                    raise RepairError(f"{self.store.url_of(self.tar)}: member {m['name']} does not match its "
                                      "manifest row (size or sha256); run verify, then verify --requeue")
                members[m["name"][len(row["key"]) + 1:]] = blob
                self.bytes += len(blob)
            yield row, members


def _members(rows: list[dict]) -> list[dict]:
    return [m for r in rows for m in (r.get("members") or [])]


def _start(members: list[dict]) -> int:
    return min(m["offset"] for m in members)


def _end(members: list[dict]) -> int:
    return max(m["offset"] + m["size"] for m in members)
