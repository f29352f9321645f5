"""One shard holding every kind of hostile sample, labeled end to end: the shard commits, each
key of the input has exactly one manifest row (ok, or error with its reason), the output tar
holds regular files with safe names only, and its json members are strict. Through the CLI with
a local Ray on local storage, and in-process on the S3 endpoint."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import boto3
import pyarrow.dataset as ds
import pytest
import webdataset as wds
from builders import encode
from helpers_cli import offline_cache, run  # noqa: F401 - autouse: offline, a private model cache
from test_hostile_images import cut_jpeg

from engine.bench.synthetic import lying_jpeg, scene, sparse_member, tar_member
from storage.names import unescape_key

LIMITS = ["--max-image-pixels", "200000", "--max-member-bytes", "300000"]
OK = {"good0", "good1", "good2", "good3", "deepjson", "nanjson", "caf%E9"}
# key in the manifest -> a fragment of its reason
REFUSED = {
    "lying": "truncated JPEG", "cut": "grey fill", "big": "exceeds --max-image-pixels",
    "thin": "exceeds --max-aspect", "link": "symbolic link", "sparse": "sparse",
    "huge": "300000", "noimage": "no image member", "k" * 247: "cannot carry",
    "ungrouped": "reappears after other keys", "dup": "repeats the extension of 'dup.jpg'",
}
ESCAPED = {"../../evil": "..", "/tmp/abs": "absolute", "caf\udce9": "UTF-8"}


def symlink(name: str, target: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def hostile_tar() -> bytes:
    photo = lambda seed: encode(scene(60, 80, seed), "JPEG", quality=90)  # noqa: E731
    parts = [
        tar_member("good0.jpg", photo(0)), tar_member("good0.json", b'{"caption": "fine"}'),
        tar_member("lying.jpg", lying_jpeg()),
        tar_member("cut.jpg", cut_jpeg(96, 128)),
        tar_member("big.jpg", encode(scene(400, 600, 1), "JPEG", quality=80)),
        tar_member("thin.png", encode(scene(10, 400, 1), "PNG")),
        bytes(512),                                            # a lone zero block: the tar goes on
        tar_member("k" * 247 + ".jpg", photo(10)),             # a legal name; its labels' would not be
        symlink("link.jpg", "good0.jpg"),
        tar_member("ungrouped.jpg", photo(12)),
        tar_member("good1.jpg", photo(1)),
        tar_member("ungrouped.json", b"{}"),                  # its key comes back: members not grouped
        tar_member("dup.jpg", photo(13)), tar_member("dup.JPG", photo(14)),   # case variants
        tar_member("sparse.jpg", photo(2)), sparse_member("sparse.bin"),
        tar_member("huge.jpg", photo(3)), tar_member("huge.bin", bytes(400_000)),
        tar_member("../../evil.jpg", photo(4)),
        tar_member("/tmp/abs.jpg", photo(5)),
        tar_member("caf\udce9.jpg", photo(6)),
        tar_member("caf%E9.jpg", photo(15)),                   # legal: the escaped key above is not this one
        tar_member("noimage.txt", b"no picture"),
        tar_member("deepjson.jpg", photo(7)), tar_member("deepjson.json", b"[" * 100_000 + b"]" * 100_000),
        tar_member("nanjson.jpg", photo(8)), tar_member("nanjson.json", b'{"score": NaN, "n": 1}'),
        tar_member("good2.jpg", photo(9)),
        bytes(1024), tar_member("good3.jpg", photo(11)),     # a second archive after the first (cat a b)
    ]
    return b"".join(parts) + bytes(1024)


def check_output(rows: list[dict], tar_bytes: bytes) -> None:
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows)                                     # one row per key
    escaped = {k for k in by_key if k not in OK and k not in REFUSED}
    assert set(by_key) == OK | set(REFUSED) | escaped and len(escaped) == len(ESCAPED)
    for key in OK:
        assert by_key[key]["status"] == "ok", by_key[key]["error"]
    for key, fragment in REFUSED.items():
        assert by_key[key]["status"] == "error" and fragment in by_key[key]["error"], by_key[key]
    originals = {unescape_key(k): k for k in escaped}                    # reversible
    for name, fragment in ESCAPED.items():
        key = originals[name.encode("utf-8", "surrogateescape")]
        assert "/" not in key and ".." not in key and key.isascii()
        assert by_key[key]["status"] == "error" and fragment in by_key[key]["error"], by_key[key]
    assert "nested deeper" in by_key["deepjson"]["notes"] and "NaN" in by_key["nanjson"]["notes"]

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:               # an independent reader
        members = t.getmembers()
    assert members and all(m.isreg() for m in members)
    assert {m.name.split(".", 1)[0] for m in members} == OK
    assert not any(m.name.startswith("/") or ".." in m.name.split("/") for m in members)
    for s in wds.WebDataset([_file(tar_bytes)], shardshuffle=False):
        meta = json.loads(s["json"], parse_constant=lambda c: pytest.fail(f"non-strict json: {c}"))
        if s["__key__"] == "nanjson":
            assert meta["input"] == {"score": None, "n": 1}
        if s["__key__"] == "good0":
            assert meta["input"] == {"caption": "fine"}


def _file(data: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
    f.write(data)
    f.close()
    return f.name


def test_hostile_shard_through_the_cli_on_ray(tmp_path, tiny_models):
    src = tmp_path / "in" / "hostile-000000.tar"
    src.parent.mkdir()
    src.write_bytes(hostile_tar())
    out = tmp_path / "out"
    p = run("label", str(src), str(out), "--teacher", tiny_models.teacher, "--sky", tiny_models.sky,
            "--workers", "1", "--batch-size", "4", *LIMITS, "--json", check=0)
    summary = json.loads(p.stdout)
    assert summary["shards_committed"] == 1 and summary["samples_ok"] == len(OK)
    rows = ds.dataset(str(out / "manifest"), format="parquet").to_table().to_pylist()
    check_output(rows, (out / "shards" / "hostile-000000.tar").read_bytes())
    assert json.loads(run("verify", str(out), "--json", check=0).stdout)["ok"]
    audit = json.loads(run("audit", str(out), "--json", check=0).stdout)
    assert audit["errors"] == len(REFUSED) + len(ESCAPED)


def test_hostile_shard_on_s3(s3_bucket, tiny_models):
    from labelers.sky import SkySegmenter
    from labelers.teacher import Teacher
    from pipelines.decode import SampleLimits
    from pipelines.pseudo_label import Labelers, label_shard
    from pipelines.tasks import ShardTask
    from storage import layout
    from storage.manifest import decode_part
    from storage.stores import open_store

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="in/hostile-000000.tar", Body=hostile_tar())
    labelers = Labelers(Teacher.load(tiny_models.teacher), SkySegmenter.load(tiny_models.sky))
    out = open_store(f"s3://{s3_bucket}/out/")
    result = label_shard(ShardTask(f"s3://{s3_bucket}/in/hostile-000000.tar", "hostile-000000"), labelers, out,
                         batch_size=4, threads=2,
                         limits=SampleLimits(max_pixels=200_000, max_member_bytes=300_000))
    assert result.committed and result.ok == len(OK)
    rows = decode_part(out.get(layout.manifest_key("hostile-000000"))).to_pylist()
    check_output(rows, out.get(layout.shard_key("hostile-000000")))


def test_the_bench_hostile_shard_is_refused_sample_by_sample(tmp_path):
    """The benchmark's shard (lying headers, 1 GiB sparse members, 10x10000) in-process with
    ground truth off: every sample is an error row, nothing expanded."""
    from engine.bench.synthetic import write_hostile_shard
    from pipelines.decode import decode, probe, sample_from_members
    from storage.shards import iter_tar_samples

    path = write_hostile_shard(tmp_path / "h.tar", 9)
    assert Path(path).stat().st_size < 1 << 20          # a megabyte that claims gigabytes
    reasons = []
    with open(path, "rb") as f:
        for members in iter_tar_samples(f):
            s = sample_from_members(members, str(path))
            probe(s)
            decode(s)
            reasons.append(s.error)
    assert len(reasons) == 9 and all(reasons)
    assert sum("truncated JPEG" in r for r in reasons) == 3
    assert sum("sparse" in r for r in reasons) == 3
    assert sum("aspect" in r for r in reasons) == 3
