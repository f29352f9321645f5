"""The object-store contract shared by the local and S3 backends, and URL dispatch.

Everything above `storage` reads and writes through `ObjectStore`, so a pipeline never knows
whether its output is a directory or a bucket. Stores hold configuration only (picklable, sent
to Ray actors); network clients are created lazily in the process that uses them.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow.fs


class StorageError(Exception):
    """A storage operation failed; the message names the operation and object, never credentials."""

    code: str | None = None  # the backend's error code when it gave one (S3: 'NoSuchBucket', ...)


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist (also a FileNotFoundError, so generic callers can catch it)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # relative to the store root, '/'-separated
    size: int
    etag: str | None  # S3 ETag (quotes stripped); local: f"{mtime_ns}-{size}"
    mtime: float | None  # seconds since epoch


@runtime_checkable
class ObjectWriter(Protocol):
    """Streaming, atomic: nothing is visible at the key until commit()."""

    bytes_written: int

    def write(self, data: bytes) -> int: ...
    def commit(self) -> ObjectInfo: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ObjectWriter: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key space under a root URL (see SPEC: output layout lives in one of these)."""

    url: str

    def child(self, prefix: str) -> ObjectStore: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...
    def get(self, key: str) -> bytes: ...
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool: ...
    def open_write(self, key: str) -> ObjectWriter: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def info(self, key: str) -> ObjectInfo | None: ...
    def delete(self, key: str) -> None: ...
    def url_of(self, key: str) -> str: ...
    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]: ...
    def abort_incomplete(self, prefix: str, before: float) -> int: ...  # orphaned writes started before `before`


class WriterBase:
    """The writer lifecycle (write* then commit or abort) shared by both backends.

    Subclasses implement `_write`, `_commit` and `_abort`; this class enforces the order, so a
    backend cannot commit twice, write after commit, or commit implicitly on `__exit__`.
    """

    def __init__(self, label: str) -> None:
        self.label = label  # the object's URL, for error messages
        self.bytes_written = 0
        self._state = "open"  # -> "committed" | "aborted"

    def write(self, data: bytes) -> int:
        if self._state != "open":
            raise StorageError(f"write to {self.label}: writer already {self._state}")
        n = self._write(memoryview(data).cast("B"))
        self.bytes_written += n
        return n

    def commit(self) -> ObjectInfo:
        if self._state != "open":
            raise StorageError(f"commit {self.label}: writer already {self._state}")
        try:
            info = self._commit()
        except BaseException:
            with suppress(Exception):  # keep the commit error, not a cleanup one
                self.abort()
            raise
        self._state = "committed"
        return info

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._abort()

    def __enter__(self) -> WriterBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after commit; never commits implicitly

    def _write(self, data: memoryview) -> int:
        raise NotImplementedError

    def _commit(self) -> ObjectInfo:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError


def check_key(key: str) -> str:
    """Reject keys that would differ between backends or escape a local root."""
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be a non-empty relative path")
    if any(part in ("", ".", "..") for part in key.split("/")) or "\\" in key or "\0" in key:
        raise ValueError(f"invalid object key {key!r}: empty, '.', '..' segments or backslashes")
    return key


def check_prefix(prefix: str) -> str:
    """A listing/child prefix: like a key but may be empty or end with '/'."""
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if body:
        check_key(body)
    elif prefix:
        raise ValueError(f"invalid prefix {prefix!r}")
    return prefix


def is_s3(url: str) -> bool:
    return url[:5].lower() == "s3://"


def _local_path(url: str) -> str:
    if url[:7].lower() == "file://":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"unsupported file URL {url!r}: only local paths (file:///dir)")
        return os.path.abspath(unquote(parts.path))
    if "://" in url:
        raise ValueError(f"unsupported URL {url!r}: expected s3://bucket/prefix, file:///dir or a path")
    if not url:
        raise ValueError("empty storage URL")
    return os.path.abspath(os.path.expanduser(url))


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"invalid S3 URL {url!r}: no bucket")
    return bucket, key


def open_store(url: str) -> ObjectStore:
    """A store rooted at `url`; local roots are made absolute and created on first write."""
    # Backends are imported here: objectstore must not import boto3 for a local run.
    if is_s3(url):
        from .s3 import S3Store

        bucket, prefix = _split_s3(url)
        return S3Store(bucket).child(prefix)
    from .local import LocalStore

    return LocalStore(_local_path(url))


def locate(url: str) -> tuple[ObjectStore, str]:
    """The store holding one object, and the object's key in it."""
    if is_s3(url):
        from .s3 import S3Store

        bucket, key = _split_s3(url)
        return S3Store(bucket), check_key(key)
    from .local import LocalStore

    if url.endswith("/"):
        raise ValueError(f"{url!r} names a directory, not an object")
    path = _local_path(url)
    parent, name = os.path.split(path)
    return LocalStore(parent), check_key(name)
