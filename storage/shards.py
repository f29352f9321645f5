"""WebDataset tar shards: a streaming sample reader and a writer that reports member offsets.

Input tars come from outside, so a member is data, never a path or a promise. The reader walks
the members itself (storage/tarstream.py, forward only, bounded) rather than through webdataset,
which drops links, devices and fifos without a trace and reads whatever a header claims (a
sparse member expands to its full size). It keeps webdataset's key/extension split and
meta-file rule, so a shard holds the same samples here as in the trainers' loaders. Each key
yields one dict: its members, or `{"__key__", "__error__"}` when a member is a link, device or
fifo, sparse, over `max_member_bytes` or unsafely named (storage/names.py); that sample becomes
an error row and the shard goes on. Damage to the tar itself raises ShardFormatError.

Writing records, for each member, where its data lands in the tar and its SHA-256: the manifest
is what the writer wrote (random access by ranged read). It writes only regular files, named as
the reader accepts.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Collection, Iterator

from storage.label_format import IMAGE_EXTENSIONS, WRITTEN
from storage.names import check_member_name, escape_key, quote_name
from storage.tarstream import BLOCK, ShardFormatError, tar_members

__all__ = ["DEFAULT_MAX_MEMBER_BYTES", "DEFAULT_MAX_SAMPLE_BYTES", "IMAGE_EXTENSIONS", "MemberRecord",
           "ShardFormatError", "TarShardWriter", "UngroupedKeys", "check_member_name", "escape_key",
           "iter_tar_samples"]

DEFAULT_MAX_MEMBER_BYTES = 512 * 2**20
DEFAULT_MAX_SAMPLE_BYTES = 2**30   # all of one sample's members together
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_NOT_READ = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
             tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
             tarfile.FIFOTYPE: "a fifo"}


class UngroupedKeys(ShardFormatError):
    """Keys whose members are not together in the tar (`a.jpg g.jpg a.json`): each must be one
    row, but the first group was read before the key came back. Found by reading the rest of the
    tar's headers; a reader that knows them (``ungrouped``) makes each key one error row."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys
        first = quote_name(sorted(keys)[0])
        super().__init__(f"key {first} reappears after other keys (members not grouped)"
                         + (f", and {len(keys) - 1} more keys" if len(keys) > 1 else ""))


def iter_tar_samples(fileobj: BinaryIO, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                     max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
                     ungrouped: Collection[str] = ()) -> Iterator[dict]:
    """One dict per key, in tar order, read forward only (never seeks, never writes a file).

    A sample is `{"__key__": key, ext: bytes, ...}` (extensions lowercase, inner dots kept:
    'disp.png'), or `{"__key__": key, "__error__": reason}` when one of its members is not a
    regular file, is sparse, is over `max_member_bytes` (never read), would bring the sample's
    members over `max_sample_bytes` together (that one and the rest never read), has an unsafe name (the
    key is then `escape_key`d) or repeats an extension of its sample (`a.jpg` twice, or `a.jpg`
    and `a.JPG`); its other members are dropped and the shard goes on. Directories, webdataset
    meta files and names with no key/extension split are skipped, as webdataset does.
    A key that reappears after other keys raises UngroupedKeys once the rest of the headers are
    read, naming every such key; with those keys in ``ungrouped`` each is one error row, at its
    first group, and its members are not read. A broken tar raises ShardFormatError where the
    damage is; every complete sample before it has been yielded.
    """
    seen: set[str] = set()
    sample: _Sample | None = None
    for info, read in (members := tar_members(fileobj)):
        key, ext = _split(info)
        if key is None:
            continue
        if sample is None or key != sample.key:
            if sample is not None and not sample.repeat:
                yield sample.result()  # complete: its key is over
            if key in seen and key not in ungrouped:
                raise UngroupedKeys(frozenset({key, *_reappearing(members, seen | {key})}))
            sample = _Sample(key, repeat=key in seen)
            seen.add(key)
            if key in ungrouped:
                sample.error = f"key {quote_name(key)} reappears after other keys (members not grouped)"
        if sample.error is None and ext in sample.names:
            sample.error = (f"member {quote_name(info.name)} repeats the extension of {quote_name(sample.names[ext])} "
                            "(extensions are compared lowercase): which one is the sample's is ambiguous")
        sample.names.setdefault(ext, info.name)
        if sample.error is None:
            sample.error = _refusal(info, key, ext, max_member_bytes)
        if sample.error is None:
            sample.size += info.size
            if sample.size > max_sample_bytes:
                sample.error = (f"sample {quote_name(key)} holds over {max_sample_bytes} bytes of members "
                                f"(--max-sample-bytes): {quote_name(info.name)} brings them to {sample.size}; not read")
            else:
                sample.members[ext] = read()
        if sample.error is not None:
            sample.members.clear()
    if sample is not None and not sample.repeat:
        yield sample.result()


def _reappearing(members: Iterator, seen: set[str]) -> set[str]:
    """The keys that come back after others in the rest of the tar, from its headers alone."""
    found, current = set(), None
    for info, _ in members:
        key, _ = _split(info)
        if key is None or key == current:
            continue
        if key in seen:
            found.add(key)
        seen.add(key)
        current = key
    return found


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    names: dict[str, str] = field(default_factory=dict)   # extension -> the member name that had it
    repeat: bool = False   # a later group of an ungrouped key: its row is the first group's
    size: int = 0          # bytes of its members so far, from their headers

    def result(self) -> dict:
        if self.error is None:
            return {"__key__": self.key, **self.members}
        return {"__key__": self.key if check_member_name(self.key) is None else escape_key(self.key),
                "__error__": self.error}


def _split(info: tarfile.TarInfo) -> tuple[str | None, str]:
    """(key, lowercase extension), or (None, "") for a member that is no part of a sample."""
    name = info.name
    if info.isdir() or _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None, ""
    # Imported here, not with the module: importing webdataset imports torch.
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key, ext.lower()) if key is not None else (None, "")


def _refusal(info: tarfile.TarInfo, key: str, ext: str, limit: int) -> str | None:
    """Why this member makes its sample an error row, or None to read it."""
    name = quote_name(info.name)
    problem = check_member_name(info.name) or check_member_name(key)
    if problem:
        return f"member {name} has an unsafe name ({problem})"
    if problem := _unwritable(key):
        return f"member {name} has a key the output cannot carry ({problem})"
    if not ext or ext.startswith("__"):
        return f"member {name} has an empty or reserved extension"
    if info.type in _NOT_READ:
        return f"member {name} is {_NOT_READ[info.type]}; links, devices and fifos are not read"
    if not info.isreg():
        return f"member {name} has tar type {info.type!r}; only regular files are read"
    if info.issparse() or any(k.startswith("GNU.sparse.") for k in info.pax_headers):
        return f"member {name} is a sparse file claiming {info.size} bytes; sparse members are not read"
    if info.size > limit:
        return f"member {name} is {info.size} bytes, over the {limit}-byte limit; not read"
    return None


def _unwritable(key: str) -> str | None:
    """Why a label member of this key would be a name the writer refuses (a key of up to 255
    bytes is legal on its own, but `<key>.depth.png` may not be), else None."""
    longest = max(WRITTEN, key=len)
    problem = check_member_name(f"{key}.{longest}")
    return None if problem is None else f"{quote_name(key + '.' + longest)}: {problem}"


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
    """Names the reader would refuse, or split differently from the writer's intent, are refused up front."""
    problem = check_member_name(key)
    if problem or "." in key.rpartition("/")[2]:
        raise ValueError(f"invalid sample key {key!r}: {problem or 'needs a last segment without dots'}")
    if not members:
        raise ValueError(f"sample {key!r} has no members")
    for ext in members:
        if not ext or "/" in ext or ext != ext.lower() or ext.startswith("__"):
            raise ValueError(f"invalid extension {ext!r} for sample {key!r} (lowercase, no '/', no '__' prefix)")
        if problem := check_member_name(f"{key}.{ext}"):
            raise ValueError(f"invalid member name {key + '.' + ext!r}: {problem}")


def iter_sample_names(fileobj: BinaryIO) -> Iterator[tuple[str, list[str]]]:
    """(key, extensions) of each sample in tar order, from the headers alone: the members' data
    is skipped unread, so counting a shard's samples costs one pass over its bytes and no
    decoding. The key/extension split and the skipped names are ``iter_tar_samples``'."""
    key: str | None = None
    exts: list[str] = []
    for info, _ in tar_members(fileobj):
        k, ext = _split(info)
        if k is None:
            continue
        if k != key:
            if key is not None:
                yield key, exts
            key, exts = k, []
        exts.append(ext)
    if key is not None:
        yield key, exts
