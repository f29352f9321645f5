"""One output shard with a lifecycle: open, add samples, then commit or abort.

The sink owns what lies between a flow's encoded samples and a committed shard: the upload of
``shards/<name>.tar``, the tar writer, the rows that become the manifest part, and the fenced
commit (storage.commit). Each row's ``members`` is what the tar writer reports for that sample
(name, data offset, size, SHA-256), so the manifest is what the writer wrote, never a second
bookkeeping. Nothing is visible before ``commit``: ``abort``, or an exception that leaves the
``with`` block, aborts the upload (as the store's writers never commit on exit). The sink
knows plain bytes and dicts only, not what the samples mean.
"""
from __future__ import annotations

import datetime as dt

from storage import inflight, layout
from storage.commit import ClaimPolicy, commit_shard
from storage.manifest import encode_part
from storage.objectstore import ObjectStore, ObjectWriter
from storage.shards import TarShardWriter


class ShardSink:
    """``with ShardSink(output, name) as sink: sink.add(...)*; sink.commit(...)``."""

    def __init__(self, output: ObjectStore, name: str, *, mtime: float | None = None, generation: int = 0) -> None:
        self.output, self.name, self.generation = output, name, generation
        self.rows: list[dict] = []
        self.tar_size = 0              # known once commit has completed the tar
        self._upload = inflight.track(output.open_write(layout.shard_key(name, generation)))  # SIGTERM aborts it
        self._gate = _Gate(self._upload)
        self._tar = TarShardWriter(self._gate, mtime)
        self._open = True              # False once commit or abort has begun

    def add(self, key: str, members: dict[str, bytes], row: dict) -> dict:
        """Append one sample's members (none for an error row) and keep its row, with the
        members' places in the tar added; returns that row."""
        self._check_open()
        records = self._tar.add(key, members) if members else []
        row = {**row, "members": [{"name": r.name, "offset": r.offset, "size": r.size, "sha256": r.sha256}
                                  for r in records]}
        self.rows.append(row)
        return row

    def commit(self, stamp: dict, owner: dict, claim: ClaimPolicy = ClaimPolicy(),
               replaces: str | None = None) -> bool:
        """Complete the tar, stamp every row with the shard's columns (shard, tar_size) and each
        new row with ``stamp`` (the caller's: source_kind, worker, attempt) and labeled_at (a row
        carried over from an earlier generation keeps when and by whom it was labeled), then
        write the manifest part under the shard's claim held by ``owner``. ``replaces``: the
        generation (the ``shard`` of the part's rows) this one supersedes; None for a first
        commit. False: another attempt had committed (or replaced) the shard already, and this
        upload was aborted."""
        self._check_open()
        self._open = False
        self.tar_size = self._tar.close()
        labeled_at = dt.datetime.now(dt.timezone.utc)
        shard = layout.shard_file(self.name, self.generation)
        for row in self.rows:
            if row.get("labeled_at") is None:
                row.update(**stamp, labeled_at=labeled_at)
            row.update(shard=shard, tar_size=self.tar_size)
        return commit_shard(self.output, self.name, self._upload, encode_part(self.rows), owner, claim,
                            replaces=replaces)

    def abort(self) -> None:
        """Drop the upload, so no object becomes visible; a no-op once the upload committed."""
        self._open = self._gate.open = False
        self._upload.abort()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()                   # also after a commit that raised midway

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"shard {self.name}: the sink has already committed or aborted")


class _Gate:
    """The upload as the tar writer sees it. After an abort it swallows writes: the stdlib tar
    stream flushes its buffer when it is collected, which would raise into nowhere."""

    def __init__(self, upload: ObjectWriter) -> None:
        self.upload, self.open = upload, True

    def write(self, data: bytes) -> int:
        return self.upload.write(data) if self.open else len(data)
