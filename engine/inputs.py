"""INPUT (SPEC §1) -> the sorted list of input shard URLs.

Forms: a brace pattern (``s3://b/raw/shard-{000000..000099}.tar``), a prefix ending in
``/`` (every ``*.tar`` below it), a local directory or glob, ``@FILE`` (one URL a line),
or a single shard URL.
"""
from __future__ import annotations

import fnmatch
import glob
import os

from braceexpand import braceexpand

from storage import layout
from storage.objectstore import is_s3, open_store

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class InputError(ValueError):
    """INPUT names nothing usable; the message says what was looked at."""


def expand(spec: str) -> list[str]:
    if not spec:
        raise InputError("INPUT is empty")
    if spec.startswith("@"):
        urls = _from_list(spec[1:])
    elif "{" in spec:
        urls = [u for part in braceexpand(spec) for u in _single_or_glob(part)]
    else:
        urls = _single_or_glob(spec)
    urls = list(dict.fromkeys(urls))
    if not urls:
        raise InputError(f"INPUT {spec!r} matches no input shard")
    _check_names(urls)
    return urls


def _from_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise InputError(f"cannot read the shard list {path!r}: {e.strerror}") from None
    return [ln if is_s3(ln) else os.path.abspath(ln) for ln in lines if ln and not ln.startswith("#")]


def _single_or_glob(spec: str) -> list[str]:
    if spec.endswith("/") or (not is_s3(spec) and os.path.isdir(spec)):
        return _tars_below(spec)
    if any(c in spec for c in "*?["):
        return _glob(spec)
    return [spec if is_s3(spec) else os.path.abspath(spec)]


def _tars_below(prefix: str) -> list[str]:
    store = open_store(prefix if prefix.endswith("/") else prefix + "/")
    return [store.url_of(o.key) for o in store.list() if o.key.lower().endswith(TAR_SUFFIXES)]


def _glob(pattern: str) -> list[str]:
    if not is_s3(pattern):
        return sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    cut = min(i for i, c in enumerate(pattern) if c in "*?[")
    base = pattern[: pattern.rfind("/", 0, cut) + 1]
    store = open_store(base)
    return [u for u in (store.url_of(o.key) for o in store.list()) if fnmatch.fnmatchcase(u, pattern)]


def _check_names(urls: list[str]) -> None:
    """Output names come from input file names: two inputs with one name would collide."""
    seen: dict[str, str] = {}
    for url in urls:
        name = layout.shard_name(url)
        if name in seen:
            raise InputError(f"two input shards share the name {name!r}: {seen[name]} and {url}")
        seen[name] = url
