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


COMPRESSED = ["a.tar.gz", "b.tgz", "c.tar.bz2", "d.tbz2", "e.tbz", "f.tar.xz", "g.TXZ", "h.tar"]


def test_a_directory_or_prefix_lists_every_form_the_reader_reads(tmp_path, s3_bucket):
    """A listing left .tar.bz2 and .tar.xz out silently ("1 total" for a directory of three)."""
    import bz2
    import gzip
    import io
    import lzma
    import tarfile

    from storage import layout
    from storage.shards import iter_tar_samples

    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as t:
        info = tarfile.TarInfo("k.jpg")
        info.size = 1
        t.addfile(info, io.BytesIO(b"J"))
    pack = {"gz": gzip.compress, "tgz": gzip.compress, "bz2": bz2.compress, "tbz2": bz2.compress,
            "tbz": bz2.compress, "xz": lzma.compress, "txz": lzma.compress, "tar": bytes}
    s3 = boto3.client("s3")
    d = tmp_path / "raw"
    d.mkdir()
    for name in [*COMPRESSED, "notes.txt", "tz.json", "a.tar.md5"]:
        data = pack.get(name.rsplit(".", 1)[1].lower(), bytes)(plain.getvalue())
        (d / name).write_bytes(data)
        s3.put_object(Bucket=s3_bucket, Key=f"raw/{name}", Body=data)
    for spec in (f"{d}/", f"s3://{s3_bucket}/raw/"):
        urls = expand(spec)
        assert _names(urls) == COMPRESSED
        assert [layout.shard_name(u) for u in urls] == list("abcdefgh")
    (d / "i.tar.zst").write_bytes(b"x")             # a form it does not read: refused, not left out
    with pytest.raises(InputError, match="1 tar.* does not take, e.g. .*i.tar.zst"):
        expand(f"{d}/")
    for name in COMPRESSED:                           # and the reader reads each one it lists
        with open(d / name, "rb") as f:
            assert [s["__key__"] for s in iter_tar_samples(f)] == ["k"]


def test_arguments_past_their_bounds_are_refused_in_one_line_and_write_nothing(tmp_path, tiny_models):
    """`@/dev/zero` grew the driver by 0.5 GB/s, a brace pattern of 10^7 names expanded for minutes,
    an OUTPUT segment over the file system's limit ended in a traceback (issue 27, finding 11)."""
    from helpers_cli import run

    from engine import inputs

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "s-000000.tar").write_bytes(b"")
    out = tmp_path / "out"
    cases = [
        (["@/dev/zero", str(out)], "is over 128 MiB"),
        ([f"{raw}/s-{{0000000..9999999}}.tar", str(out)], "names more than 1,000,000 shards"),
        ([f"{raw}/", str(tmp_path / ("o" * 300) / "out")], "a path segment of 300 bytes, over the file system's 255"),
    ]
    for argv, message in cases:
        p = run("label", *argv, "--teacher", tiny_models.teacher, "--sky", "none")
        assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe not text")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        expand(f"@{tmp_path / 'list.txt'}")
    assert inputs.MAX_LIST_BYTES >= 100 * 2**20 and inputs.MAX_PATTERN_NAMES >= 500_000   # room for real jobs
