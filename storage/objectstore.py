"""The object-store contract shared by the local and S3 backends, and URL dispatch.

Everything above `storage` reads and writes through `ObjectStore`, so a pipeline never knows
whether its output is a directory or a bucket. Stores hold configuration only (picklable, sent
to Ray actors); network clients are created lazily in the process that uses them.
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from storage.names import MAX_SEGMENT_BYTES

if TYPE_CHECKING:
    import pyarrow.fs


class StorageError(Exception):
    """A storage operation failed; the message names the operation and object, never credentials."""

    code: str | None = None  # the backend's error code when it gave one (S3: 'NoSuchBucket', ...)


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist (also a FileNotFoundError, so generic callers can catch it)."""


class InvalidURL(StorageError, ValueError):
    """A URL no store can open (``s3://`` without a bucket, ``gs://...``): a configuration error
    like any StorageError for the CLI, and still a ValueError for callers that expect one."""


_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/\s]*)@")   # scheme, user:pass


_REMEMBERED: set[str] = set()   # credentials seen in this process's arguments (remember_credentials)


def redact(text: str) -> str:
    """Blank out credentials a server, a library or a URL echoed into a message: the secret
    AWS variables, the password of an endpoint URL, the ``user:pass@`` of any URL, and any
    credentials the arguments held, wherever a library quotes them without their URL (botocore:
    'Invalid bucket name "KEY:SECRET@bucket"'). Here rather than beside boto3, so the CLI can
    redact without importing it."""
    secrets = [os.environ.get(name) for name in _SECRET_VARS]
    secrets += [_password(os.environ.get(name) or "") for name in _ENDPOINT_VARS]
    for value in sorted(filter(None, [*secrets, *_REMEMBERED]), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", text)


def remember_credentials(texts: list[str]) -> None:
    """Note the ``user:pass@`` of every URL in ``texts`` (the command line), so that redact()
    blanks them, and each of their parts, in any message, with or without the URL around them."""
    for text in texts:
        for _, userinfo in _USERINFO.findall(text):
            _REMEMBERED.update(p for p in (userinfo, *userinfo.split(":", 1)) if len(p) >= 4)


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:  # a malformed endpoint: botocore will say so, and the regex still redacts
        return None


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
    """A flat key space under a root URL (see SPEC: output layout lives in one of these).

    ``list`` yields keys in UTF-8 byte order (S3's), optionally one range of it:
    ``start_after < key <= stop_after`` (either bound may be None), so disjoint ranges can be
    listed in parallel and their results concatenated into the full listing."""

    url: str

    def child(self, prefix: str) -> ObjectStore: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...
    def get(self, key: str) -> bytes: ...
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool: ...
    def open_write(self, key: str) -> ObjectWriter: ...
    def list(self, prefix: str = "", *, start_after: str | None = None,
             stop_after: str | None = None) -> Iterator[ObjectInfo]: ...
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


def local_path(url: str) -> str:
    """A local path or file:// URL as an absolute path; another scheme is an InvalidURL (it
    would otherwise become a strange relative path)."""
    if url[:7].lower() == "file://":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidURL(f"unsupported file URL {url!r}: only local paths (file:///dir)")
        return os.path.abspath(unquote(parts.path))
    if "://" in url:
        raise InvalidURL(f"unsupported URL {redact(url)!r}: expected s3://bucket/prefix, file:///dir or a path")
    if not url:
        raise InvalidURL("empty storage URL")
    return _within_name_limits(os.path.abspath(os.path.expanduser(url)))


_PATH_ROOM = 3072        # bytes of a root path, leaving room under PATH_MAX (4096) for the keys below it


def _within_name_limits(path: str) -> str:
    """A local root the file system can hold, checked before anything is created under it: a
    segment over NAME_MAX ended the job in a traceback ('File name too long')."""
    raw = os.fsencode(path)
    if (longest := max(map(len, raw.split(b"/")))) > MAX_SEGMENT_BYTES:
        raise InvalidURL(f"local path {path[:60]!r}...: a path segment of {longest} bytes, over the "
                         f"file system's {MAX_SEGMENT_BYTES}")
    if len(raw) > _PATH_ROOM:
        raise InvalidURL(f"local path {path[:60]!r}...: {len(raw)} bytes, over {_PATH_ROOM} (the keys below it "
                         "need room under the file system's 4096)")
    return path


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise InvalidURL(f"invalid S3 URL {redact(url)!r}: no bucket (expected s3://bucket/prefix)")
    if "@" in bucket:   # no bucket name holds one: credentials, which boto3 would quote back
        raise InvalidURL(f"invalid S3 URL {redact(url)!r}: credentials do not go in a URL; give them as "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile")
    return bucket, key


def _object_key(url: str, key: str) -> str:
    try:
        return check_key(key)
    except ValueError as e:
        raise InvalidURL(f"{url!r} names no object: {e}") from None
