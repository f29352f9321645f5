"""A directory as an object store, with the same atomicity as S3.

Writes go to a hidden temp file beside the target and are renamed into place after fsync, so a
crash never leaves a half-written object under its final name (the commit protocol in SPEC §2
relies on this). Listing skips those temp files.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator

from .objectstore import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    WriterBase,
    check_key,
    check_prefix,
)

if TYPE_CHECKING:
    import pyarrow.fs

_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def _temp_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.tmp-{uuid.uuid4().hex}")


def _fsync_dir(path: str) -> None:
    """Make a rename durable: the directory entry lives in the directory, not the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LocalWriter(WriterBase):
    """Streams into `.<name>.tmp-<uuid>`; commit = fsync + os.replace + fsync of the directory."""

    def __init__(self, store: LocalStore, key: str) -> None:
        super().__init__(store.url_of(key))
        self._store, self._key = store, key
        self._path = store.path_of(key)
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._temp = _temp_path(self._path)
            self._file = open(self._temp, "xb")
        except OSError as e:
            raise StorageError(f"open_write {self.label}: {e.strerror or e}") from e

    def _write(self, data: memoryview) -> int:
        return self._file.write(data)

    def _commit(self) -> ObjectInfo:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._path)
            _fsync_dir(os.path.dirname(self._path))
        except OSError as e:
            raise StorageError(f"commit {self.label}: {e.strerror or e}") from e
        info = self._store.info(self._key)
        assert info is not None
        return info

    def _abort(self) -> None:
        self._file.close()
        _unlink_quietly(self._temp)


@dataclass(frozen=True, slots=True)
class LocalStore:
    """Objects are files under `root` (absolute); keys are '/'-separated relative paths."""

    root: str

    def __post_init__(self) -> None:
        if not os.path.isabs(self.root):
            raise ValueError(f"LocalStore root must be absolute, got {self.root!r}")
        object.__setattr__(self, "root", os.path.normpath(self.root))

    @property
    def url(self) -> str:
        return self.root.rstrip("/") + "/"

    def path_of(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def url_of(self, key: str) -> str:
        return self.path_of(key)

    def child(self, prefix: str) -> LocalStore:
        prefix = check_prefix(prefix).strip("/")
        return LocalStore(os.path.join(self.root, *prefix.split("/"))) if prefix else self

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(f"open_read {self.url_of(key)}: no such object") from e
        except OSError as e:
            raise StorageError(f"open_read {self.url_of(key)}: {e.strerror or e}") from e

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length), fewer at the end of the object."""
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        with self.open_read(key) as f:
            f.seek(start)
            return f.read(length)

    def get(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Atomic write; with if_absent, os.link refuses an existing name (no check-then-write race)."""
        path = self.path_of(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temp = _temp_path(path)
            try:
                with open(temp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if if_absent:
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        return False
                else:
                    os.replace(temp, path)
            finally:
                _unlink_quietly(temp)
            _fsync_dir(os.path.dirname(path))
        except OSError as e:
            raise StorageError(f"put {self.url_of(key)}: {e.strerror or e}") from e
        return True

    def open_write(self, key: str) -> LocalWriter:
        return LocalWriter(self, key)

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.path_of(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            _unlink_quietly(self.path_of(key))
        except (IsADirectoryError, NotADirectoryError):
            pass
        except OSError as e:
            raise StorageError(f"delete {self.url_of(key)}: {e.strerror or e}") from e

    def list(self, prefix: str = "", *, start_after: str | None = None,
             stop_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, sorted by key; a range
        (start_after < key <= stop_after) is a filter over the same walk."""
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]  # deepest directory that can hold matches
        found = self._walk(base + "/" if base else "", prefix)
        if start_after is None and stop_after is None:
            return found
        return (o for o in found
                if (start_after is None or o.key > start_after) and (stop_after is None or o.key <= stop_after))

    def _walk(self, dir_key: str, prefix: str) -> Iterator[ObjectInfo]:
        path = os.path.join(self.root, *dir_key.split("/")) if dir_key else self.root
        try:
            with os.scandir(path) as it:
                entries = [e for e in it if not _TEMP_NAME.match(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sort as full keys would sort: a directory 'a' stands for 'a/...', which follows 'a.txt'.
        is_dir = {e.name: e.is_dir(follow_symlinks=False) for e in entries}
        entries.sort(key=lambda e: e.name + "/" if is_dir[e.name] else e.name)
        for entry in entries:
            key = dir_key + entry.name
            if is_dir[entry.name]:
                sub = key + "/"
                if sub.startswith(prefix) or prefix.startswith(sub):
                    yield from self._walk(sub, prefix)
            elif key.startswith(prefix) and entry.is_file():
                st = entry.stat()
                yield ObjectInfo(key, st.st_size, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)

    def abort_incomplete(self, prefix: str, before: float) -> int:
        """Remove writers' temp files under `prefix` last touched before `before`: the
        orphans of writers that died. Returns how many were removed."""
        check_prefix(prefix)
        top = os.path.join(self.root, *prefix.rstrip("/").split("/")) if prefix else self.root
        n = 0
        for dirpath, _, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                if _TEMP_NAME.match(name) and os.stat(path).st_mtime < before:
                    _unlink_quietly(path)
                    n += 1
        return n

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs  # noqa: F811 - imported lazily: pyarrow is heavy and not always needed

        return pyarrow.fs.LocalFileSystem(), self.root
