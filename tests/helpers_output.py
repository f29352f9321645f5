"""An independent check of an OUTPUT: every manifest part against its tar, read with
boto3 / the filesystem, tarfile and pyarrow (not the engine's own storage code)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import boto3
import pyarrow.parquet as pq


def _split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix


def list_objects(output: str, sub: str) -> dict[str, dict]:
    """name -> {"etag", "size"} of the objects under OUTPUT/sub/."""
    if output.startswith("s3://"):
        bucket, prefix = _split(output)
        out = {}
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/{sub}/"):
            for o in page.get("Contents", []):
                out[o["Key"].rsplit("/", 1)[1]] = {"etag": o["ETag"], "size": o["Size"]}
        return out
    d = Path(output) / sub
    return {p.name: {"etag": f"{p.stat().st_mtime_ns}-{p.stat().st_size}", "size": p.stat().st_size}
            for p in sorted(d.iterdir()) if not p.name.startswith(".")} if d.exists() else {}


def read(output: str, key: str) -> bytes:
    if output.startswith("s3://"):
        bucket, prefix = _split(output)
        return boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{key}")["Body"].read()
    return (Path(output) / key).read_bytes()


def check_agreement(output: str) -> dict:
    """Assert every committed shard's manifest part agrees exactly with its tar (keys,
    member names, sizes, checksums) and no key appears twice. Returns the counts."""
    keys_seen: set[tuple[str, str]] = set()
    rows_total = ok_total = 0
    parts = list_objects(output, "manifest")
    for part in parts:
        name = part[: -len(".parquet")]
        rows = pq.read_table(io.BytesIO(read(output, f"manifest/{part}"))).to_pylist()
        blob = read(output, f"shards/{name}.tar")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            members = {m.name: m for m in tf.getmembers()}
        recorded = {}
        for r in rows:
            source_key = (r["source"], r["key"])
            assert source_key not in keys_seen, f"key {r['key']} of {r['source']} appears twice"
            keys_seen.add(source_key)
            assert r["shard"] == f"{name}.tar" and r["tar_size"] == len(blob)
            if r["status"] == "ok":
                ok_total += 1
                assert r["members"], f"{name}: ok row {r['key']} has no members"
            for m in r["members"]:
                recorded[m["name"]] = m
        rows_total += len(rows)
        assert set(recorded) == set(members), f"{name}: tar members differ from the manifest part"
        for mname, m in recorded.items():
            data = blob[m["offset"]: m["offset"] + m["size"]]
            assert members[mname].size == m["size"], f"{name}/{mname}: size differs"
            assert hashlib.sha256(data).hexdigest() == m["sha256"], f"{name}/{mname}: checksum differs"
    return {"committed": len(parts), "rows": rows_total, "ok": ok_total}


def processes(title: str, under: set[int] | None = None) -> list[int]:
    """Pids whose command line starts with ``title`` (Ray names actor processes ray::Class);
    with ``under``, only descendants of those pids (one cluster's raylets: another test may run
    a Ray of its own at the same time). The chaos bench's own reading of /proc."""
    from engine.bench.chaos import command_lines, descends

    return [pid for pid, cmd in command_lines().items()
            if cmd.startswith(title) and (under is None or descends(pid, under))]
