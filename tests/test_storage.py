"""storage/: object stores (local, S3 on moto and Ceph) and WebDataset shards.

Store tests run on every backend through the `store_url` fixture; shards are checked with
independent readers (the webdataset library, stdlib tarfile, ranged reads of the bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import random
import tarfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from storage.local import LocalStore
from storage.objectstore import ObjectInfo, ObjectNotFound, StorageError, is_s3
from storage.s3 import PART_SIZE, S3Store
from storage.shards import (
    MemberRecord,
    ShardFormatError,
    TarShardWriter,
    iter_tar_samples,
)
from storage.stores import locate, open_store

MiB = 1024 * 1024


@pytest.fixture
def store(store_url):
    return open_store(store_url)


def visible_keys(store, prefix=""):
    return [o.key for o in store.list(prefix)]


def pending_uploads(store) -> list[dict]:
    """Incomplete multipart uploads under the store's prefix (S3 only)."""
    s3 = boto3.session.Session().client("s3")  # the default session would keep stale credentials
    response = s3.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return response.get("Uploads", [])


def samples(n: int, size: int = 700) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"s{i:04d}", {"jpg": os.urandom(size + i), "disp.png": os.urandom(100 + i), "json": b'{"i": %d}' % i})
        for i in range(n)
    ]


# --------------------------------------------------------------------------- object stores


def test_put_get_and_if_absent(store):
    assert store.put("a/b.bin", b"one") is True
    assert store.get("a/b.bin") == b"one"
    assert store.put("a/b.bin", b"two", if_absent=True) is False
    assert store.get("a/b.bin") == b"one"
    assert store.put("a/b.bin", b"three") is True
    assert store.get("a/b.bin") == b"three"
    assert store.put("a/c.bin", b"four", if_absent=True) is True
    info = store.info("a/c.bin")
    assert info is not None and (info.key, info.size) == ("a/c.bin", 4)
    now = time.time()
    assert info.etag and abs(info.mtime - now) < 300          # a real timestamp, not a placeholder
    assert visible_keys(store) == ["a/b.bin", "a/c.bin"]


def test_put_if_absent_has_exactly_one_winner(store):
    barrier = threading.Barrier(8)

    def contend(i: int) -> bool:
        barrier.wait()
        return store.put("marker.json", b"writer %d" % i, if_absent=True)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(contend, range(8)))
    assert results.count(True) == 1
    assert store.get("marker.json") == b"writer %d" % results.index(True)


def test_open_write_is_invisible_until_commit(store):
    with store.open_write("out/x.tar") as writer:
        assert writer.write(b"abc") == 3
        writer.write(memoryview(b"defg"))
        assert writer.bytes_written == 7
        assert store.info("out/x.tar") is None and visible_keys(store) == []
        info = writer.commit()
    assert isinstance(info, ObjectInfo) and (info.key, info.size) == ("out/x.tar", 7)
    assert info == store.info("out/x.tar")
    assert store.get("out/x.tar") == b"abcdefg"
    with pytest.raises(StorageError):
        writer.write(b"more")
    writer.abort()  # after commit: nothing to undo
    assert store.get("out/x.tar") == b"abcdefg"
    if isinstance(store, S3Store):
        assert writer.upload_id is None  # under one part: a single PutObject


def test_open_write_abort_leaves_nothing(store):
    with store.open_write("a.bin") as writer:
        writer.write(b"never committed")
    with pytest.raises(RuntimeError), store.open_write("b.bin") as writer:
        writer.write(b"x")
        raise RuntimeError("failed mid-write")
    writer = store.open_write("big.bin")
    writer.write(os.urandom(PART_SIZE + 1))  # past one part: an upload is in progress on S3
    if isinstance(store, S3Store):
        assert writer.upload_id is not None
        assert [u["UploadId"] for u in pending_uploads(store)] == [writer.upload_id]
    writer.abort()
    writer.abort()  # idempotent
    assert visible_keys(store) == []
    if isinstance(store, S3Store):
        assert pending_uploads(store) == []
    else:
        assert os.listdir(store.root) == []  # no temp files left behind


def test_large_streamed_write_is_multipart_with_bounded_buffer(store):
    data = os.urandom(PART_SIZE + 3 * MiB + 123)
    view = memoryview(data)
    with store.open_write("large.bin") as writer:
        writer.write(view[:MiB])
        writer.write(view[MiB : MiB + PART_SIZE + MiB])  # one call larger than a part
        for pos in range(MiB + PART_SIZE + MiB, len(data), MiB):
            writer.write(view[pos : pos + MiB])
        info = writer.commit()
    assert info.size == writer.bytes_written == len(data)
    if isinstance(store, S3Store):
        assert writer.upload_id is not None
        assert 0 < writer.peak_buffer <= PART_SIZE
    digest = hashlib.sha256()
    with store.open_read("large.bin") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.info("large.bin").etag == info.etag


def test_list_is_recursive_sorted_and_prefix_filtered(store):
    keys = ["b/c/d", "a0", "a/x", "a.txt", "a-b", "a/y/z", "ab", "a/y.json"]
    for key in keys:
        store.put(key, key.encode())
    pending = store.open_write("a/pending.bin")
    pending.write(b"uncommitted")
    try:
        listed = list(store.list())
        assert [o.key for o in listed] == sorted(keys)
        assert all(o.size == len(o.key) for o in listed)
        assert visible_keys(store, "a") == sorted(k for k in keys if k.startswith("a"))
        assert visible_keys(store, "a/") == ["a/x", "a/y.json", "a/y/z"]
        assert visible_keys(store, "a/y") == ["a/y.json", "a/y/z"]
        assert visible_keys(store, "b/c/") == ["b/c/d"]
        assert visible_keys(store, "zz") == []
        assert visible_keys(store.child("a")) == ["x", "y.json", "y/z"]
        assert visible_keys(store.child("a/y/")) == ["z"]
    finally:
        pending.abort()


def test_list_paginates_past_1000_keys(s3_server):
    store = S3Store(s3_server.bucket())
    keys = [f"many/{i:05d}.json" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(lambda k: store.put(k, b"{}"), keys))
    store.put("other", b"")
    assert visible_keys(store, "many/") == keys
    assert visible_keys(store.child("many")) == [k.removeprefix("many/") for k in keys]
    assert len(visible_keys(store)) == 1101


def test_read_range(store):
    data = bytes(range(256)) * 40
    store.put("r.bin", data)
    assert store.read_range("r.bin", 0, 10) == data[:10]
    assert store.read_range("r.bin", 1000, 500) == data[1000:1500]
    assert store.read_range("r.bin", len(data) - 5, 100) == data[-5:]
    assert store.read_range("r.bin", len(data), 10) == b""
    assert store.read_range("r.bin", 7, 0) == b""
    with pytest.raises(ValueError):
        store.read_range("r.bin", -1, 5)


def test_missing_objects(store):
    for call in (
        lambda: store.get("nope"),
        lambda: store.open_read("no/such.tar"),
        lambda: store.read_range("nope", 0, 10),
        lambda: store.read_range("nope", 0, 0),
    ):
        with pytest.raises(ObjectNotFound) as caught:
            call()
        assert isinstance(caught.value, FileNotFoundError) and "no such object" in str(caught.value)
    assert store.info("nope") is None
    store.delete("nope")  # missing is fine
    store.put("gone", b"x")
    store.delete("gone")
    assert store.info("gone") is None and visible_keys(store) == []


def test_open_read_streams_into_tar_reader(store):
    expected = samples(6, size=200_000)
    with store.open_write("shards/in.tar") as out:
        shard = TarShardWriter(out, mtime=0)
        for key, members in expected:
            shard.add(key, members)
        shard.close()
        out.commit()
    with store.open_read("shards/in.tar") as f:
        got = list(iter_tar_samples(f))
    assert [s["__key__"] for s in got] == [k for k, _ in expected]
    assert [{k: v for k, v in s.items() if k != "__key__"} for s in got] == [m for _, m in expected]
    with store.open_read("shards/in.tar") as f:  # a consumer may stop early and close
        first = next(iter_tar_samples(f))
    assert first["jpg"] == expected[0][1]["jpg"]


def test_arrow_filesystem_parquet_round_trip(store):
    fs, root = store.arrow_filesystem()
    assert root == store.url.rstrip("/").removeprefix("s3://")
    table = pa.table({"key": ["a", "b"], "width": pa.array([3, 4], pa.int32())})
    fs.create_dir(f"{root}/manifest", recursive=True)
    pq.write_table(table, f"{root}/manifest/p0.parquet", filesystem=fs)
    store.put("manifest/p1.parquet", store.get("manifest/p0.parquet"))
    assert visible_keys(store) == ["manifest/p0.parquet", "manifest/p1.parquet"]  # no dir markers
    assert pq.read_table(pa.BufferReader(store.get("manifest/p0.parquet"))).equals(table)
    read = pads.dataset(f"{root}/manifest", filesystem=fs, format="parquet").to_table()
    assert read.num_rows == 4 and sorted(read.column("key").to_pylist()) == ["a", "a", "b", "b"]


def test_urls_round_trip_through_locate_and_open_store(store):
    store.put("d/f.bin", b"payload")
    url = store.url_of("d/f.bin")
    assert url == store.url + "d/f.bin" and is_s3(url) == isinstance(store, S3Store)
    parent, key = locate(url)
    assert parent.get(key) == b"payload"
    assert open_store(store.url).get("d/f.bin") == b"payload"
    child = store.child("d")
    assert child.url == store.url + "d/" and child.get("f.bin") == b"payload"
    assert open_store(child.url).url == child.url


def test_store_pickles_without_credentials(store):
    store.put("p", b"1")
    blob = pickle.dumps(store)
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    assert not secret or secret.encode() not in blob
    assert b"botocore" not in blob and b"boto3" not in blob  # no client travels with it
    assert pickle.loads(blob).get("p") == b"1"


def test_url_parsing(tmp_path, monkeypatch):
    assert open_store("s3://bkt/out").url == "s3://bkt/out/"
    assert open_store("s3://bkt").url == "s3://bkt/"
    assert open_store("s3://bkt/a/b/").url == "s3://bkt/a/b/"
    s3, key = locate("s3://b/x/y.tar")
    assert (s3, key) == (S3Store("b"), "x/y.tar") and s3.url == "s3://b/"
    assert is_s3("s3://b/k") and is_s3("S3://b/k") and not is_s3("/s3/b")
    assert open_store(f"file://{tmp_path}/x") == LocalStore(f"{tmp_path}/x")
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/dir")
    assert rel.url == f"{tmp_path}/rel/dir/" and not (tmp_path / "rel").exists()
    local, key = locate("shards/one.tar")
    assert (local.url, key) == (f"{tmp_path}/shards/", "one.tar")
    for bad in ("s3://", "s3:///k", "gs://b/k", "http://host/x", ""):
        with pytest.raises(ValueError):
            open_store(bad)
    for bad in ("s3://b/", "s3://b", "/some/dir/"):
        with pytest.raises(ValueError):
            locate(bad)
    for bad in ("../x", "a/../b", "/abs", "a//b", "dir/"):
        with pytest.raises(ValueError):
            open_store(str(tmp_path)).put(bad, b"")


def test_local_root_is_created_on_first_write(local_root):
    store = open_store(local_root)
    assert store.url == local_root + "/" and not os.path.exists(local_root)
    assert visible_keys(store) == [] and store.info("x") is None
    store.put("deep/er/x", b"1")
    assert os.path.isfile(os.path.join(local_root, "deep", "er", "x"))


def test_s3_errors_name_the_object_never_the_secret(s3_backend, monkeypatch):
    from botocore.exceptions import ClientError

    from storage.s3_client import storage_error

    secret = "SENTINEL-secret-" + "9" * 24
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3Store(f"missing-{os.getpid()}-bucket")
    with pytest.raises(StorageError) as caught:
        store.get("k/obj")
    error = caught.value
    text = "".join(traceback.format_exception(error)) + repr(error)
    assert "get s3://missing-" in str(error) and error.code  # operation, object, S3 code
    assert secret not in text and secret not in str(pickle.dumps(store))
    # A server that echoes the secret back in its message still does not leak it.
    echoed = ClientError({"Error": {"Code": "AccessDenied", "Message": f"bad key {secret}"}}, "GetObject")
    mapped = storage_error("get", "s3://b/k", echoed)
    assert mapped.code == "AccessDenied" and "s3://b/k" in str(mapped) and secret not in str(mapped)


def test_s3_read_resumes_after_a_dropped_connection(s3_server):
    from botocore.exceptions import ReadTimeoutError

    store = S3Store(s3_server.bucket())
    data = os.urandom(3 * MiB)
    store.put("k", data)
    f = store.open_read("k")
    body = f.raw._body

    class DropsOnce:
        def __init__(self):
            self.dropped = False

        def read(self, n):
            if f.raw.tell() >= MiB and not self.dropped:
                self.dropped = True
                raise ReadTimeoutError(endpoint_url="test")
            return body.read(n)

        def close(self):
            body.close()

    flaky = f.raw._body = DropsOnce()
    with f:
        assert f.read() == data
    assert flaky.dropped


# --------------------------------------------------------------------------- shards


def test_iter_tar_samples_reads_webdataset_tarwriter_output(tmp_path):
    path = str(tmp_path / "wds.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "img/000", "jpg": b"J0", "disp.png": b"D0", "json": b"{}"})
        sink.write({"__key__": "img/001", "JPEG": b"J1", "txt": b"caption"})
    with open(path, "rb") as f:
        got = list(iter_tar_samples(f))
    assert got == [
        {"__key__": "img/000", "jpg": b"J0", "disp.png": b"D0", "json": b"{}"},
        {"__key__": "img/001", "jpeg": b"J1", "txt": b"caption"},
    ]


def test_tar_shard_writer_records_match_independent_readers(store, tmp_path):
    expected = samples(5) + [("long/" + "n" * 150, {"jpg": b"pax-named", "json": b"{}"})]
    with store.open_write("shards/out.tar") as out:
        shard = TarShardWriter(out, mtime=1_700_000_000)
        records = [r for key, members in expected for r in shard.add(key, members)]
        total = shard.close()
        assert shard.close() == total  # idempotent
        info = out.commit()
    assert info.size == total and total % 10240 == 0
    data = store.get("shards/out.tar")

    for record in records:  # every record, by ranged read of the stored object
        assert isinstance(record, MemberRecord)
        chunk = store.read_range("shards/out.tar", record.offset, record.size)
        assert len(chunk) == record.size and hashlib.sha256(chunk).hexdigest() == record.sha256
    names = [f"{k}.{ext}" for k, members in expected for ext in members]
    assert [r.name for r in records] == names

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == names
        for m, record in zip(members, records):
            assert (m.offset_data, m.size) == (record.offset, record.size)
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (1_700_000_000, 0o444, 0, 0, "", "")

    path = tmp_path / "copy.tar"
    path.write_bytes(data)
    loaded = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in loaded] == [k for k, _ in expected]
    assert all(s[ext] == members[ext] for s, (_, members) in zip(loaded, expected) for ext in members)
    with open(path, "rb") as f:
        files = list(tar_file_iterator(f))
    assert [f["fname"] for f in files] == names

    again = io.BytesIO()  # deterministic: the same input and mtime give the same bytes
    rewrite = TarShardWriter(again, mtime=1_700_000_000)
    for key, members in expected:
        rewrite.add(key, members)
    rewrite.close()
    assert again.getvalue() == data


def test_tar_shard_writer_refuses_ambiguous_names():
    shard = TarShardWriter(io.BytesIO(), mtime=0)
    for key, members in [("a.b", {"jpg": b""}), ("", {"jpg": b""}), ("k", {}), ("k", {"JPG": b""})]:
        with pytest.raises(ValueError):
            shard.add(key, members)
    shard.add("k", {"jpg": b"1"})
    with pytest.raises(ValueError):
        shard.add("k", {"json": b"{}"})
    shard.close()
    with pytest.raises(ValueError):
        shard.add("m", {"jpg": b"1"})


def _tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_broken_streams_raise_shard_format_error():
    good = _tar_bytes([("a.jpg", b"A" * 600), ("a.json", b"{}"), ("b.jpg", b"B" * 600), ("c.jpg", b"C")])
    assert [s["__key__"] for s in iter_tar_samples(io.BytesIO(good))] == ["a", "b", "c"]
    assert [s["__key__"] for s in iter_tar_samples(io.BytesIO(gzip.compress(good)))] == ["a", "b", "c"]
    assert list(iter_tar_samples(io.BytesIO(_tar_bytes([])))) == []

    noise = random.Random(0).randbytes(4096)
    for garbage in (b"", b"not a tar at all" * 100, noise, b"\x1f\x8b" + noise, b"BZh9" + noise, good[:300]):
        with pytest.raises(ShardFormatError):
            list(iter_tar_samples(io.BytesIO(garbage)))

    # Layout: a.jpg @0 (data to 1536), a.json @1536, b.jpg @2560 (data 3072..4096), c.jpg @4096.
    yielded_before_damage = {
        1000: [],  # inside a.jpg's data: 'a' is incomplete
        2100: [],  # inside a.json's data
        3996: ["a"],  # inside b.jpg's data: 'a' is complete, 'b' is not
        4096: ["a"],  # exactly between members, no end-of-archive block: 'b' may be incomplete
        4296: ["a"],  # inside c.jpg's header
    }
    for cut, expected in yielded_before_damage.items():
        got = []
        with pytest.raises(ShardFormatError):
            for sample in iter_tar_samples(io.BytesIO(good[:cut])):
                got.append(sample["__key__"])
        assert got == expected, cut

    regrouped = _tar_bytes([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}")])
    with pytest.raises(ShardFormatError, match="reappears"):     # a reader that is not told which keys
        list(iter_tar_samples(io.BytesIO(regrouped)))
