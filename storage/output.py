"""One OUTPUT as its readers see it (SPEC §2; the keys are storage.layout's): whether a URL
holds an OUTPUT at all, which shards are committed, failed or pending, and where a shard's
tar is.

Asked of one view so that resume, status, audit, verify, evaluate and the trainer decide and
count alike. Everything here comes from listings and at most one small GET (job.json): no
shard or manifest part is read. What job.json's fields mean is the engine's (engine/job.py);
this only says whether it is there and hands over the parsed object.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Iterable

from storage import layout
from storage.listing import list_expecting
from storage.objectstore import ObjectStore

_PART = ".parquet"     # manifest/<name>.parquet: the shard is committed
_MARKER = ".json"      # failed/<name>.json: the shard used up its attempts


@dataclass(frozen=True)
class ShardCounts:
    total: int
    committed: int
    failed: int
    pending: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardStates:
    """Which shards are committed and which failed, from one listing of manifest/ and one of
    failed/. A shard that failed and later committed (a retry) is committed: its failed/
    marker is history, not a state."""

    committed: frozenset[str]
    failed: frozenset[str]      # failed and not committed

    def pending(self, names: Iterable[str]) -> list[str]:
        """``names``, in their order, less the committed and the failed."""
        return [n for n in names if n not in self.committed and n not in self.failed]

    def counts(self, names: Iterable[str]) -> ShardCounts:
        """``names`` (one per shard asked for) counted as committed, failed or pending."""
        names = list(names)
        committed = sum(n in self.committed for n in names)
        failed = sum(n in self.failed for n in names)
        return ShardCounts(len(names), committed, failed, len(names) - committed - failed)


@dataclass(frozen=True)
class Output:
    """A view over one OUTPUT store; each call lists or reads afresh (nothing is cached)."""

    store: ObjectStore

    @property
    def url(self) -> str:
        return self.store.url

    def is_output(self) -> bool:
        """job.json or at least one manifest part. A URL with neither is a typo or an INPUT:
        auditing or verifying it would vacuously pass."""
        if self.store.info(layout.JOB) is not None:
            return True
        return any(layout.name_from_key(o.key, layout.MANIFEST, _PART) for o in self.store.list(layout.MANIFEST))

    def job(self) -> dict | None:
        """job.json as parsed JSON, unchecked; None when there is none."""
        try:
            return json.loads(self.store.get(layout.JOB))
        except FileNotFoundError:
            return None

    def committed(self, names: Iterable[str] | None = None) -> frozenset[str]:
        """Names with a manifest part (a part's presence means committed). ``names``, the shards
        the caller expects, only lets a large S3 listing run as parallel ranges
        (storage.listing): the result is the same."""
        return self._listed(layout.MANIFEST, _PART, names)

    def failed(self, names: Iterable[str] | None = None) -> frozenset[str]:
        """Names that used up their attempts and are not committed."""
        return self.states(names).failed

    def states(self, names: Iterable[str] | None = None) -> ShardStates:
        names = None if names is None else list(names)
        committed = self.committed(names)
        return ShardStates(committed, self._listed(layout.FAILED, _MARKER, names) - committed)

    def pending(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        return self.states(names).pending(names)

    def counts(self, names: Iterable[str]) -> ShardCounts:
        names = list(names)
        return self.states(names).counts(names)

    def _listed(self, directory: str, suffix: str, names: list[str] | None) -> frozenset[str]:
        expected = None if names is None else [f"{directory}{n}{suffix}" for n in names]
        found = (layout.name_from_key(o.key, directory, suffix)
                 for o in list_expecting(self.store, directory, expected))
        return frozenset(n for n in found if n)

    def requeue(self, name: str, problems: Iterable[str]) -> str:
        """Put committed shard ``name`` back in the queue: its commit record (the manifest part)
        is copied to requeued/ with why, then removed, so the next ``label`` run relabels the
        shard whole. Copy before delete: a crash in between leaves the shard committed and the
        copy behind, and a second call completes it. Returns the kept record's key."""
        part = self.store.get(layout.manifest_key(name))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        kept = layout.requeued_key(name, stamp, _PART)
        self.store.put(kept, part)
        why = {"shard": name, "requeued_at": stamp, "problems": list(problems), "record": kept}
        self.store.put(layout.requeued_key(name, stamp, _MARKER), json.dumps(why, indent=2).encode())
        self.store.delete(layout.manifest_key(name))
        return kept

    def tar_key(self, shard: str) -> str:
        """The key of the tar a manifest row's ``shard`` names: the generation that row belongs
        to. Every reader that holds rows asks here (a repaired shard's tar is not <name>.tar)."""
        name, generation = layout.parse_shard_file(shard)
        return layout.shard_key(name, generation)

    def tar_keys(self, names: Iterable[str]) -> dict[str, str]:
        """Committed shard name -> the key of its current tar, for readers that hold names, not
        rows (evaluate). From a listing of shards/: in the steady state each committed shard has
        one tar. Where a repair was interrupted two generations are present, and the shard's
        manifest part (one GET) says which is current."""
        names = list(names)
        present: dict[str, list[tuple[int, str]]] = {}
        for o in list_expecting(self.store, layout.SHARDS, [layout.shard_key(n) for n in names]):
            try:
                name, generation = layout.parse_shard_file(o.key[len(layout.SHARDS):])
            except ValueError:
                continue
            present.setdefault(name, []).append((generation, o.key))
        keys = {}
        for n in names:
            found = present.get(n, [])
            if len(found) == 1:
                keys[n] = found[0][1]
            else:       # two: an interrupted repair, the part decides; none: the reader will say so
                keys[n] = self.current_tar_key(n) if found else layout.shard_key(n)
        return keys

    def current_tar_key(self, name: str) -> str:
        """The tar key shard ``name``'s manifest part names (one GET of the part); generation 0
        when it has no part."""
        # pyarrow, imported here: the listing-only commands (status) never need it
        from storage.manifest import tars_of

        try:
            shards = tars_of(self.store.get(layout.manifest_key(name)))
        except FileNotFoundError:
            return layout.shard_key(name)
        return self.tar_key(min(shards)) if shards else layout.shard_key(name)

    @staticmethod
    def name_of(shard: str) -> str:
        """A manifest row's ``shard`` ("<name>.tar", "<name>/g<N>.tar") -> the shard's name; a
        bare name (compare's ``shard`` column) is returned as it is."""
        try:
            return layout.parse_shard_file(shard)[0]
        except ValueError:
            if "/" in shard:
                raise
            return shard
