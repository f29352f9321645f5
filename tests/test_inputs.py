"""INPUT forms (SPEC §1) on local storage and on S3."""
from __future__ import annotations

import boto3
import pytest

from engine.inputs import InputError, expand


def _names(urls):
    return [u.rsplit("/", 1)[1] for u in urls]


@pytest.fixture
def local_shards(tmp_path):
    d = tmp_path / "raw"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        (d / f"shard-{i:06d}.tar").write_bytes(b"x")
    (d / "sub" / "shard-000010.tar").write_bytes(b"x")
    (d / "notes.txt").write_text("not a shard")
    return d


def test_local_forms(local_shards, tmp_path):
    d = local_shards
    every = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000010.tar"]
    assert _names(expand(f"{d}/")) == every
    assert _names(expand(str(d))) == every
    assert _names(expand(f"{d}/shard-{{000000..000001}}.tar")) == every[:2]
    assert _names(expand(f"{d}/shard-*.tar")) == every[:3]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my shards\n{d}/shard-000002.tar\n\n{d}/sub/shard-000010.tar\n")
    assert _names(expand(f"@{lst}")) == every[2:]


def test_name_collisions_and_empty_inputs_are_refused(local_shards, tmp_path):
    (local_shards / "sub" / "shard-000001.tar").write_bytes(b"x")
    with pytest.raises(InputError, match="share the name"):
        expand(f"{local_shards}/")
    with pytest.raises(InputError, match="matches no input shard"):
        expand(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(InputError, match="cannot read"):
        expand(f"@{tmp_path}/missing.txt")


def test_s3_forms(s3_bucket):
    s3 = boto3.client("s3")
    for i in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"raw/shard-{i:06d}.tar", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key="raw/readme.md", Body=b"x")
    base = f"s3://{s3_bucket}/raw"
    every = [f"{base}/shard-{i:06d}.tar" for i in range(3)]
    assert expand(f"{base}/") == every
    assert expand(f"{base}/shard-{{000001..000002}}.tar") == every[1:]
    assert expand(f"{base}/shard-00000[02].tar") == [every[0], every[2]]
