"""Samples to leave out of training, named by (shard, key) rows of Parquet files.

`depth-engine compare --out` writes such a file, one row per compared sample with boolean
columns such as `disagree` and `inverted`; `PATH:COLUMN` keeps only the rows where COLUMN is
true, so a trainer can drop the samples two teachers disagree on. A row names a sample by its
shard's name ("shard-000001", or the tar's file name "shard-000001.tar") and its key, which
hold in every OUTPUT labeled from the same INPUT: a file applies to every OUTPUT it is given for.

Read once when the loader plans its shards, so a bad file is refused before the first step
(as TrainSetupError, a ValueError: the CLI prints its one line and exits 2).
"""
from __future__ import annotations

import io
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.student.errors import TrainSetupError
from storage.output import Output
from storage.stores import locate

_NEEDED = ("shard", "key")


def check_specs(specs) -> tuple[str, ...]:
    """``LoaderConfig.exclude`` as a tuple (a lone string would be read as its characters)."""
    if isinstance(specs, str) or not all(isinstance(s, str) and s for s in specs):
        raise ValueError(f"exclude must be a tuple of Parquet URLs (PATH or PATH:COLUMN), got {specs!r}")
    return tuple(specs)


def excluded_keys(specs: Iterable[str]) -> dict[str, frozenset[str]]:
    """Shard name -> the keys to leave out, over all ``specs`` (PATH or PATH:COLUMN)."""
    out: dict[str, set[str]] = {}
    for spec in specs:
        for shard, key in _rows(spec):
            out.setdefault(Output.name_of(shard), set()).add(key)
    return {name: frozenset(keys) for name, keys in out.items()}


def _rows(spec: str) -> list[tuple[str, str]]:
    """The (shard, key) pairs one spec selects; nulls name nothing."""
    url, data, schema, column = _open(spec)
    if not all(c in schema.names for c in _NEEDED):
        raise TrainSetupError(f"exclude {spec}: {url} needs columns 'shard' and 'key', "
                              f"it has {', '.join(schema.names)}")
    for name in _NEEDED:
        if not _is_text(schema.field(name).type):
            raise TrainSetupError(f"exclude {spec}: column {name!r} is {schema.field(name).type}, not string")
    if column is not None and not pa.types.is_boolean(schema.field(column).type):
        raise TrainSetupError(f"exclude {spec}: column {column!r} is {schema.field(column).type}, not boolean")
    table = pq.read_table(io.BytesIO(data), columns=[*_NEEDED, *([column] if column else [])])
    if column is not None:
        table = table.filter(table.column(column).fill_null(False))
    return [(s, k) for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())
            if s is not None and k is not None]


def _open(spec: str) -> tuple[str, bytes, pa.Schema, str | None]:
    """(url, its bytes, its schema, the column selected or None). The part after the last ':' selects a
    column only when it is a column of the file before it (an s3:// URL has a ':' too)."""
    url, sep, column = spec.rpartition(":")
    if sep and url and column and "/" not in column:
        data = _get(url)
        if data is not None:
            schema = _schema(spec, url, data)
            if column in schema.names:
                return url, data, schema, column
            if _get(spec) is None:
                raise TrainSetupError(f"exclude {spec}: {url} has no column {column!r} "
                                      f"(it has {', '.join(schema.names)})")
    data = _get(spec)
    if data is None:
        raise TrainSetupError(f"exclude {spec}: no such file")
    return spec, data, _schema(spec, spec, data), None


def _get(url: str) -> bytes | None:
    try:
        store, key = locate(url)
        return store.get(key)
    except (FileNotFoundError, IsADirectoryError, ValueError):   # ValueError: not the URL of an object
        return None


def _schema(spec: str, url: str, data: bytes) -> pa.Schema:
    """The file's schema; a file that is not Parquet is refused."""
    try:
        return pq.read_schema(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise TrainSetupError(f"exclude {spec}: {url} is not a Parquet file ({reason})") from None


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)
