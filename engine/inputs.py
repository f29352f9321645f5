"""INPUT (SPEC §1) -> the sorted list of input shard URLs.

Forms: a brace pattern (``s3://b/raw/shard-{000000..000099}.tar``), a prefix ending in
``/`` (every ``*.tar`` below it), a local directory or glob, ``@FILE`` (one URL a line),
or a single shard URL.

Everything INPUT names is checked here, before a job touches OUTPUT: every URL must name an
object (no network), give a safe and unique shard name, and exist when it is local.
"""
from __future__ import annotations

import fnmatch
import glob
import itertools
import os
import re

from braceexpand import braceexpand

from storage import layout
from storage.objectstore import InvalidURL, is_s3, local_path
from storage.stores import locate, open_store


# Tars in the compressions GNU tar knows that the reader does not take (a .tar.md5 is not one).
_OTHER_TAR = re.compile(r"\.(tar\.(zst|zstd|lz4|lz|lzma|lzo|z|br|sz)|tzst|tlz|tlz4|taz|tz)$", re.IGNORECASE)


MAX_LIST_BYTES = 128 * 2**20        # @FILE: about a million shard URLs
MAX_PATTERN_NAMES = 1_000_000       # a brace pattern's names


class InputError(ValueError):
    """INPUT names nothing usable; the message says what was looked at."""


def expand(spec: str, exclude: str | None = None) -> list[str]:
    """The input shard URLs, leaving out any under ``exclude`` (the OUTPUT root): an OUTPUT
    inside the INPUT tree holds ``shards/*.tar`` that are labels, not inputs, and leaving them
    out by place (not by what exists) gives the same list on the first run and on a rerun."""
    if not spec:
        raise InputError("INPUT is empty")
    if spec.startswith("@"):
        urls = _from_list(spec[1:])
    elif "{" in spec:
        urls = [u for part in _braces(spec) for u in _single_or_glob(part)]
    else:
        urls = _single_or_glob(spec)
    urls = list(dict.fromkeys(urls))
    for url in urls:
        _check_url(url)
    root = open_store(exclude).url if exclude else None
    kept = [u for u in urls if not (root and _under(u, root))]
    if not kept:
        left = len(urls) - len(kept)
        why = f" ({left} under OUTPUT {exclude} left out)" if left else ""
        raise InputError(f"INPUT {spec!r} matches no input shard{why}")
    _check_names(kept)
    _check_local_files(kept)
    return kept


def _from_list(path: str) -> list[str]:
    """The shard list of ``@FILE``, read up to MAX_LIST_BYTES (a million long URLs): a list past
    it, or ``@/dev/zero``, is refused, not read into the driver's memory."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LIST_BYTES + 1)   # one bounded read: a device's position never moves
    except OSError as e:
        raise InputError(f"cannot read the shard list {path!r}: {e.strerror}") from None
    if len(data) > MAX_LIST_BYTES:
        raise InputError(f"the shard list {path!r} is over {MAX_LIST_BYTES >> 20} MiB; split the job, "
                         "or name the shards with a prefix or a pattern")
    try:
        lines = [ln.strip() for ln in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise InputError(f"the shard list {path!r} is not UTF-8 text (byte {e.start})") from None
    return [ln if is_s3(ln) else _local(ln) for ln in lines if ln and not ln.startswith("#")]


def _braces(spec: str) -> list[str]:
    """The names of a brace pattern, expanded lazily up to MAX_PATTERN_NAMES."""
    names = list(itertools.islice(braceexpand(spec), MAX_PATTERN_NAMES + 1))
    if len(names) > MAX_PATTERN_NAMES:
        raise InputError(f"INPUT {spec!r} names more than {MAX_PATTERN_NAMES:,} shards; split the job, "
                         "or name the shards with a prefix")
    return names


def _single_or_glob(spec: str) -> list[str]:
    if spec.endswith("/") or (not is_s3(spec) and os.path.isdir(spec)):
        return _tars_below(spec)
    if any(c in spec for c in "*?["):
        return _glob(spec)
    return [spec if is_s3(spec) else _local(spec)]


def _local(path: str) -> str:
    """An absolute path; a URL of a scheme other than s3:// and file:// is refused, not read
    as a relative path."""
    try:
        return local_path(path)
    except InvalidURL as e:
        raise InputError(f"INPUT: {e}") from None


def _tars_below(prefix: str) -> list[str]:
    """Every tar below the prefix; a tar in a compression the reader does not take is refused,
    not left out (a directory of .tar.zst shards would otherwise be a job of none of them)."""
    store = open_store(prefix if prefix.endswith("/") else prefix + "/")
    keys = [o.key for o in store.list()]
    if unread := [k for k in keys if _OTHER_TAR.search(k) and not k.lower().endswith(layout.TAR_SUFFIXES)]:
        raise InputError(f"INPUT: {len(unread)} tar(s) in a compression the reader does not take, e.g. "
                         f"{store.url_of(unread[0])} (it reads {', '.join(layout.TAR_SUFFIXES)}): "
                         "decompress them or name the shards to label")
    return [store.url_of(k) for k in keys if k.lower().endswith(layout.TAR_SUFFIXES)]


def _glob(pattern: str) -> list[str]:
    if not is_s3(pattern):
        return sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    cut = min(i for i, c in enumerate(pattern) if c in "*?[")
    base = pattern[: pattern.rfind("/", 0, cut) + 1]
    store = open_store(base)
    return [u for u in (store.url_of(o.key) for o in store.list()) if fnmatch.fnmatchcase(u, pattern)]


def _check_url(url: str) -> None:
    """Each URL must name one object; found here, not by a worker (parsing only, no network)."""
    try:
        locate(url)
    except InvalidURL as e:
        raise InputError(f"INPUT names {url!r}, which is not a shard: {e}") from None


def _under(url: str, root: str) -> bool:
    """Whether ``url`` lies below the store root URL ``root`` (local paths compared resolved)."""
    if is_s3(url) != is_s3(root):
        return False
    if is_s3(url):
        store, key = locate(url)
        return store.url_of(key).startswith(root)
    return os.path.realpath(url).startswith(os.path.realpath(root) + os.sep)


def _check_local_files(urls: list[str]) -> None:
    """A missing local shard is a typo, refused before OUTPUT is created (S3 URLs are not
    checked: one request per URL of a brace pattern would cost more than the job's plan)."""
    missing = [u for u in urls if not is_s3(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"input shard {missing[0]} does not exist{more}")


def _check_names(urls: list[str]) -> None:
    """Output names come from input file names: each must be a safe key segment, and two
    inputs with one name would collide."""
    seen: dict[str, str] = {}
    for url in urls:
        try:
            name = layout.shard_name(url)
        except ValueError as e:
            raise InputError(str(e)) from None
        if name in seen:
            raise InputError(f"two input shards share the name {name!r}: {seen[name]} and {url}")
        seen[name] = url
