"""Where things live inside an OUTPUT (SPEC §2). One place, so resume, status,
audit and the trainer agree on the names."""
from __future__ import annotations

import posixpath
import re

from storage.names import check_member_name

JOB = "job.json"
SHARDS = "shards/"
MANIFEST = "manifest/"
FAILED = "failed/"
LOCKS = "locks/"
REQUEUED = "requeued/"   # commit records moved aside by `verify --requeue`, kept for the record
RUNS = "runs/"           # one record per finished `label` run: its measured rate (`label --dry-run` reads it)

# The input shard names the engine lists and reads (storage.tarstream decompresses each kind);
# the shard's name is the file name without it.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_TAR_SUFFIX = re.compile("(" + "|".join(map(re.escape, sorted(TAR_SUFFIXES, key=len, reverse=True))) + ")$",
                         re.IGNORECASE)


def strip_tar_suffix(name: str) -> str:
    """'a/shard-1.tar.xz' -> 'a/shard-1'; a name without a tar suffix is returned unchanged."""
    return _TAR_SUFFIX.sub("", name)


def shard_name(input_url: str) -> str:
    """The input shard's file name without its tar suffix: 'raw/shard-000123.tar' -> 'shard-000123'."""
    base = posixpath.basename(input_url.rstrip("/"))
    try:
        return check_shard_name(strip_tar_suffix(base))
    except ValueError as e:
        raise ValueError(f"input shard {input_url!r}: {e}") from None


def check_shard_name(name: str) -> str:
    """A shard name is one segment of several keys (shards/<name>.tar, locks/shards/<name>/),
    so it must be one safe path segment on every backend ('.tar' or '...tar' would not be):
    the tar member rule of storage.names, on a single segment."""
    problem = "a '/'" if "/" in name else check_member_name(name)
    if problem:
        raise ValueError(f"the shard name {name!r} (the file name without .tar) is unsafe: {problem}")
    return name


def shard_file(name: str, generation: int = 0) -> str:
    """A shard's tar under shards/, as the manifest's ``shard`` column names it:
    '<name>.tar' as first labeled, '<name>/g<N>.tar' once ``label --repair-errors`` rewrote it
    for the N-th time. The '/' cannot occur in a shard name, so the name and the generation
    read back unambiguously (parse_shard_file)."""
    if generation < 0:
        raise ValueError(f"shard {name}: generation {generation} < 0")
    return f"{name}.tar" if generation == 0 else f"{name}/g{generation}.tar"


_GENERATION = re.compile(r"^(?P<name>[^/]+)/g(?P<generation>[1-9][0-9]*)\.tar$")


def parse_shard_file(shard: str) -> tuple[str, int]:
    """A manifest row's ``shard`` -> (the shard's name, its generation); inverse of shard_file."""
    m = _GENERATION.match(shard)
    if m:
        return m["name"], int(m["generation"])
    if "/" in shard or not shard.endswith(".tar") or shard == ".tar":
        raise ValueError(f"{shard!r} names no shard tar (expected '<name>.tar' or '<name>/g<N>.tar')")
    return shard[: -len(".tar")], 0


def shard_key(name: str, generation: int = 0) -> str:
    """The key of one generation of a shard's tar. Readers take the generation from the
    manifest (storage.output), never assume 0."""
    return f"{SHARDS}{shard_file(name, generation)}"


def shard_tar_prefix(name: str) -> str:
    """Where the repaired generations of shard ``name`` live (shards/<name>/)."""
    return f"{SHARDS}{name}/"


def manifest_key(name: str) -> str:
    return f"{MANIFEST}{name}.parquet"


def failed_key(name: str) -> str:
    return f"{FAILED}{name}.json"


def requeued_key(name: str, stamp: str, suffix: str) -> str:
    """requeued/<name>.<UTC stamp>.parquet (the commit record) and .json (why)."""
    return f"{REQUEUED}{name}.{stamp}{suffix}"


def run_key(stamp: str) -> str:
    """runs/<UTC stamp>.json: stamps sort by time, so the latest run is the greatest key."""
    return f"{RUNS}{stamp}.json"


def claim_prefix(name: str) -> str:
    """Where the commit claims of one shard live (storage.commit)."""
    return f"{LOCKS}shards/{name}/"


JOB_LOCK = f"{LOCKS}job/"


def name_from_key(key: str, directory: str, suffix: str) -> str | None:
    """'manifest/shard-1.parquet' -> 'shard-1' (None for anything else in that directory)."""
    if not key.startswith(directory) or not key.endswith(suffix):
        return None
    name = key[len(directory):-len(suffix)]
    return name if name and "/" not in name else None
