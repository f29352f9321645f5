"""Where things live inside an OUTPUT (SPEC §2). One place, so resume, status,
audit and the trainer agree on the names."""
from __future__ import annotations

import posixpath
import re

JOB = "job.json"
SHARDS = "shards/"
MANIFEST = "manifest/"
FAILED = "failed/"
LOCKS = "locks/"

_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz)$", re.IGNORECASE)


def shard_name(input_url: str) -> str:
    """The input shard's file name without its tar suffix: 'raw/shard-000123.tar' -> 'shard-000123'."""
    base = posixpath.basename(input_url.rstrip("/"))
    name = _TAR_SUFFIX.sub("", base)
    if not name:
        raise ValueError(f"input shard URL has no file name: {input_url!r}")
    return name


def shard_key(name: str) -> str:
    return f"{SHARDS}{name}.tar"


def manifest_key(name: str) -> str:
    return f"{MANIFEST}{name}.parquet"


def failed_key(name: str) -> str:
    return f"{FAILED}{name}.json"


def claim_prefix(name: str) -> str:
    """Where the commit claims of one shard live (pipelines.commit)."""
    return f"{LOCKS}shards/{name}/"


JOB_LOCK = f"{LOCKS}job/"


def name_from_key(key: str, directory: str, suffix: str) -> str | None:
    """'manifest/shard-1.parquet' -> 'shard-1' (None for anything else in that directory)."""
    if not key.startswith(directory) or not key.endswith(suffix):
        return None
    name = key[len(directory):-len(suffix)]
    return name if name and "/" not in name else None


def listed_names(store, directory: str, suffix: str) -> set[str]:
    """Names with an object in ``directory`` (one listing, nothing read)."""
    names = (name_from_key(o.key, directory, suffix) for o in store.list(directory))
    return {n for n in names if n}
