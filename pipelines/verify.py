"""``verify``: every committed shard re-read and checked against its manifest part.

A manifest part promises that it describes its tar exactly (SPEC §2). Trainers rely on that
promise for ranged reads, so this checks it after the fact (after a copy, a lifecycle rule, a
bad disk) without trusting the writer: same keys, every member present with its recorded offset,
size and sha256, label PNGs decoding to the row's size. Each tar is streamed once with
tarfile's 'r|' mode and never held whole; a worker holds at most one member at a time.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image

from pipelines.concurrency import prefetch_map
from storage import layout
from storage.label_format import LABEL_SIZED, is_label_shape, label_row_shape
from storage.manifest import decode_part
from storage.objectstore import ObjectNotFound, ObjectStore
from storage.output import Output
from storage.stores import open_store

DEFAULT_WORKERS = 8
CHUNK = 1024 * 1024  # read size inside a member, and tarfile's stream buffer
BLOCK = tarfile.BLOCKSIZE
PNG_SUFFIXES = tuple(f".{member}" for member in LABEL_SIZED)  # the engine's label PNGs
_PNG_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class NotAnOutput(ValueError):
    """The URL holds neither job.json nor manifest/: verifying it would vacuously pass."""


@dataclass(frozen=True)
class BadShard:
    shard: str                  # the shard's name, as in manifest/<name>.parquet
    problems: tuple[str, ...]   # one short sentence each, naming the member or key


@dataclass(frozen=True)
class VerifyResult:
    checked: int                # committed shards read
    bad: tuple[BadShard, ...]   # sorted by shard

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_json(self) -> dict:
        return {"checked": self.checked, "ok": self.ok,
                "bad": [{"shard": b.shard, "problems": list(b.problems)} for b in self.bad]}


def verify(output: ObjectStore | str, workers: int | None = None) -> VerifyResult:
    """Check every committed shard of OUTPUT (a store or its URL), `workers` shards at a time."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    store = open_store(output) if isinstance(output, str) else output
    view = Output(store)
    names = sorted(view.committed())
    if not names and not view.is_output():
        raise NotAnOutput(f"{store.url} has no job.json and no manifest/: not a depth-engine OUTPUT")
    n = workers or max(1, min(DEFAULT_WORKERS, len(names)))
    results = _parallel(lambda name: check_shard(store, name), names, n)
    bad = tuple(BadShard(name, tuple(p)) for name, p in zip(names, results) if p)
    return VerifyResult(checked=len(names), bad=bad)


def _parallel(fn, names: list[str], workers: int):
    """fn over names in order; only a few calls run ahead, so pending work stays bounded
    however many shards there are, and an error cancels what has not started."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="verify")
    try:
        yield from prefetch_map(fn, names, pool, depth=2 * workers)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def check_shard(store: ObjectStore, name: str) -> list[str]:
    """The problems of one shard; empty when its tar agrees with its manifest part."""
    try:
        rows = decode_part(store.get(layout.manifest_key(name))).to_pylist()
    except ObjectNotFound:
        return ["manifest part vanished while verifying"]
    except (pa.ArrowException, OSError) as e:
        return [f"manifest part unreadable: {e}"]
    expected, problems = expected_members(name, rows)
    files = {r.get("shard") for r in rows}
    if len(files) > 1:
        return [*problems, f"rows name more than one tar: {', '.join(sorted(map(str, files)))}"]
    try:    # the generation the rows name (storage.layout.shard_file)
        tar = Output(store).tar_key(files.pop() if files else layout.shard_file(name))
    except (TypeError, ValueError):
        return problems           # a row's problem already says which tar it names
    info = store.info(tar)
    if info is None:
        return [*problems, "tar missing"]
    problems += _tar_size_problems(rows, info.size)
    return problems + _TarCheck(expected).run(store, tar)


@dataclass(frozen=True)
class Expected:
    """One member as the manifest records it, with its row's label size for the PNG check."""

    offset: int
    size: int
    sha256: str
    width: int | None
    height: int | None


def expected_members(name: str, rows: list[dict]) -> tuple[dict[str, Expected], list[str]]:
    """Member name -> what the rows promise, and the problems of the rows themselves."""
    expected: dict[str, Expected] = {}
    problems: list[str] = []
    keys: set = set()
    for row in rows:
        key = row.get("key")
        if key in keys:
            problems.append(f"key {key} has more than one row")
        keys.add(key)
        problems += _row_problems(name, row)
        for m in row.get("members") or []:
            if m["name"] in expected:
                problems.append(f"member {m['name']} recorded twice")
            label_h, label_w = label_row_shape(row) if row.get("height") is not None else (None, None)
            expected[m["name"]] = Expected(m["offset"], m["size"], m["sha256"], label_w, label_h)
    return expected, problems


def _row_problems(name: str, row: dict) -> list[str]:
    key, status, members = row.get("key"), row.get("status"), row.get("members") or []
    problems = []
    if _shard_name(row.get("shard")) != name:
        problems.append(f"row {key} names shard {row.get('shard')!r}")
    if status == "ok" and not members:
        problems.append(f"ok row {key} has no members")
    elif status == "error" and members:
        problems.append(f"error row {key} has members (an error sample is not in the tar)")
    elif status not in ("ok", "error"):
        problems.append(f"row {key} has status {status!r}")
    problems += [f"member {m['name']} recorded under key {key}"
                 for m in members if not m["name"].startswith(f"{key}.")]
    if status == "ok" and row.get("height") is not None and row.get("width") is not None:
        label = label_row_shape(row)
        if not is_label_shape(label, (row["height"], row["width"])):
            problems.append(f"row {key}: label size {label[1]}x{label[0]} is not a downscale of its image's "
                            f"{row['width']}x{row['height']}")
    return problems


def _tar_size_problems(rows: list[dict], actual: int) -> list[str]:
    recorded = {r.get("tar_size") for r in rows}
    if len(recorded) > 1:
        return [f"rows disagree on tar_size: {sorted(recorded, key=str)}"]
    if recorded and recorded != {actual}:
        return [f"tar size {actual} differs from the manifest's tar_size {recorded.pop()}"]
    return []


class _TarCheck:
    """One forward pass over a tar, comparing each member with what the manifest expects."""

    def __init__(self, expected: dict[str, Expected]) -> None:
        self.expected = dict(expected)
        self.problems: list[str] = []
        self.seen: set[str] = set()
        self.where = "at the start"

    def run(self, store: ObjectStore, key: str) -> list[str]:
        try:
            with store.open_read(key) as raw, tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as tar:
                self._walk(tar)
        except ObjectNotFound:
            return ["tar missing"]
        except (tarfile.TarError, EOFError) as e:
            self.problems.append(f"tar truncated or unreadable: {e} ({self.where})")
            if self.expected:
                self.problems.append(f"{len(self.expected)} recorded members not reached")
            return self.problems
        return self.problems + [f"member {n} missing from the tar" for n in sorted(self.expected)]

    def _walk(self, tar: tarfile.TarFile) -> None:
        while (info := tar.next()) is not None:
            tar.members.clear()  # stream mode would otherwise keep every header it read
            self.where = f"in member {info.name}"
            self.problems += self._member(tar, info)
            self.where = f"after member {info.name}"
        _check_end(tar)

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> list[str]:
        name = info.name
        if name in self.seen:
            return [f"member {name} appears twice in the tar"]
        self.seen.add(name)
        want = self.expected.pop(name, None)
        if want is None or not info.isreg():
            return [f"unexpected member {name} in the tar"]
        keep = name.endswith(PNG_SUFFIXES)
        digest, data = _read_member(tar, info, keep)
        problems = []
        if info.size != want.size:
            problems.append(f"member {name}: size {info.size} differs from the manifest's {want.size}")
        if info.offset_data != want.offset:
            problems.append(f"member {name}: offset {info.offset_data} differs from the manifest's {want.offset}")
        if digest != want.sha256:
            problems.append(f"member {name}: sha256 differs from the manifest's")
        if data is not None:
            problems += _png_problems(name, data, want)
        return problems


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, keep: bool) -> tuple[str, bytes | None]:
    """sha256 of the member's data, read in chunks; the bytes only when `keep` (one member)."""
    digest, parts = hashlib.sha256(), []
    f = tar.extractfile(info)
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        if keep:
            parts.append(chunk)
    return digest.hexdigest(), b"".join(parts) if keep else None


def _png_problems(name: str, data: bytes, want: Expected) -> list[str]:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            size = im.size
    except _PNG_ERRORS as e:
        return [f"member {name} does not decode as PNG: {e}"]
    if size != (want.width, want.height):
        return [f"member {name} is {size[0]}x{size[1]}, the row says {want.width}x{want.height}"]
    return []


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile stops quietly when a stream ends between two members (how a cut copy often
    ends), so require the two zero blocks that close every tar the writer makes."""
    header = tar.fileobj.tell() - tar.offset  # bytes of the block tarfile read as a header
    if header != BLOCK or tar.fileobj.read(BLOCK) != bytes(BLOCK):
        raise tarfile.ReadError(f"no end-of-archive blocks at byte {tar.offset}")


def _shard_name(shard) -> str | None:
    """The shard a row's ``shard`` belongs to (any generation); None when it names no tar."""
    try:
        return layout.parse_shard_file(shard)[0]
    except (TypeError, ValueError):
        return None
