"""WebDataset tar shards: a streaming sample reader and a writer that reports member offsets.

Reading uses webdataset's own tar iteration and grouping, so a shard means here exactly what
it means to the trainers' loaders. Writing records, for each member, where its data lands in the
tar and its SHA-256: the manifest is what the writer wrote (random access by ranged read).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

IMAGE_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})
BLOCK = tarfile.BLOCKSIZE
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_FORMAT_ERRORS = (tarfile.TarError, EOFError, ValueError, zlib.error, lzma.LZMAError)


class ShardFormatError(ValueError):
    """The stream is not a readable tar, or a member repeats (names are the sample's identity)."""


class _Tail(io.RawIOBase):
    """Passes reads through, remembering the first and last bytes and whether EOF was seen.

    tarfile stops silently when a stream ends exactly between two members, which is how a
    truncated copy often ends; the last block then is member data, not the zero end-of-archive
    block, and this lets the reader tell the two apart without seeking.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        super().__init__()
        self._f, self.head, self.tail, self.eof = fileobj, b"", b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._f.read(len(view))
        if not data:
            self.eof = True
            return 0
        view[: len(data)] = data
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-BLOCK:] if len(data) < BLOCK else data[-BLOCK:]
        return len(data)

    def __repr__(self) -> str:
        return "<tar stream>"

    def unterminated(self) -> bool:
        """EOF reached, uncompressed, and the last block is not the zero end-of-archive block."""
        compressed = self.head.startswith(_COMPRESSED_MAGIC)
        return self.eof and not compressed and self.tail != bytes(BLOCK)


def _checked_files(stream: _Tail) -> Iterator[dict]:
    """tar_file_iterator's files, refusing repeated names, split keys and a missing end block.

    On damage, the sample being grouped is released first (an empty dict is group_by_keys'
    end-of-shard marker) when the member that failed is known to start a new key, so every
    complete sample before the damage reaches the caller and no partial one does.
    """
    announced = [""]  # the member tar_file_iterator is about to read

    def announce(name: str) -> bool:  # select_files sees each name before its data is read
        announced[0] = name
        return True

    files = tar_file_iterator(stream, select_files=announce)
    seen_keys: set[str] = set()
    current, names = None, set()
    try:
        for file in files:
            key, ext = base_plus_ext(file["fname"])
            if key is not None:
                if key != current:
                    if key in seen_keys:
                        raise ShardFormatError(f"key {key!r} reappears after other keys (members not grouped)")
                    seen_keys.add(key)
                    current, names = key, set()
                if ext.lower() in names:
                    raise ShardFormatError(f"duplicate member {file['fname']!r}")
                names.add(ext.lower())
            file["__url__"] = None  # group_by_keys expects it; dropped from the samples
            yield file
    except _FORMAT_ERRORS:
        if current is not None and base_plus_ext(announced[0])[0] not in (None, current):
            yield {}
        raise
    if stream.unterminated():
        raise ShardFormatError("truncated tar: the stream ends without the end-of-archive block")


def iter_tar_samples(fileobj: BinaryIO) -> Iterator[dict]:
    """Samples `{"__key__": key, ext: bytes, ...}` in tar order, read forward only (never seeks).

    Extensions are lowercase and keep inner dots ('disp.png'). A broken tar raises
    ShardFormatError where the damage is; the complete samples before it have been yielded.
    """
    stream = _Tail(fileobj)
    try:
        for sample in group_by_keys(_checked_files(stream)):
            sample.pop("__url__", None)
            yield sample
    except ShardFormatError:
        raise
    except _FORMAT_ERRORS as e:
        reason = str(e.args[0]) if e.args else type(e).__name__
        raise ShardFormatError(f"unreadable tar: {reason.removesuffix(f' @ {stream!r}')}") from e


@dataclass(frozen=True, slots=True)
class MemberRecord:
    name: str  # f"{key}.{ext}"
    offset: int  # byte offset of the member's DATA in the tar (for ranged reads)
    size: int
    sha256: str  # hex


class _Counter:
    """Counts bytes on their way to the destination (tarfile does not report its padding)."""

    def __init__(self, fileobj: Any) -> None:
        self.fileobj, self.count = fileobj, 0

    def write(self, data: bytes) -> int:
        self.fileobj.write(data)
        self.count += len(data)
        return len(data)


class TarShardWriter:
    """Writes WebDataset samples to a writable stream (an ObjectWriter), recording where each member lands.

    webdataset.TarWriter is not used because it does not report member offsets, which the
    manifest needs for ranged reads. This writes with the stdlib tarfile in stream mode (the
    destination need not seek) and deterministic headers, so equal input gives equal bytes.
    """

    def __init__(self, fileobj: Any, mtime: float | None = None) -> None:
        self.mtime = int(time.time() if mtime is None else mtime)  # int: a float adds a pax header
        self._out = _Counter(fileobj)
        self._tar = tarfile.open(fileobj=self._out, mode="w|", format=tarfile.PAX_FORMAT)
        self._keys: set[str] = set()
        self._total: int | None = None

    def add(self, key: str, members: dict[str, bytes]) -> list[MemberRecord]:
        """Append one sample; members are written in the given order."""
        if self._total is not None:
            raise ValueError("TarShardWriter is closed")
        _check_sample(key, members)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        records = []
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            offset = self._tar.offset - -(-len(data) // BLOCK) * BLOCK
            records.append(MemberRecord(info.name, offset, len(data), hashlib.sha256(data).hexdigest()))
        return records

    def close(self) -> int:
        """Write the end-of-archive blocks; returns the tar's size. The destination stays open."""
        if self._total is None:
            self._tar.close()
            self._total = self._out.count
        return self._total


def _check_sample(key: str, members: dict[str, bytes]) -> None:
    """Names readers would split differently from the writer's intent are refused up front."""
    base = key.rpartition("/")[2]
    if not base or "." in base or key.startswith("/"):
        raise ValueError(f"invalid sample key {key!r}: needs a name without dots")
    if not members:
        raise ValueError(f"sample {key!r} has no members")
    for ext in members:
        if not ext or "/" in ext or ext != ext.lower():
            raise ValueError(f"invalid extension {ext!r} for sample {key!r} (lowercase, no '/')")
