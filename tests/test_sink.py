"""The shard sink on local storage and a real S3 endpoint: what it commits is read back with
the stdlib tarfile (an independent reader) at the offsets the rows recorded; abort and an
exception leave nothing behind; a second attempt's commit is fenced."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from storage import layout
from storage.commit import ClaimPolicy
from storage.manifest import decode_part
from storage.sink import ShardSink
from storage.stores import open_store

SAMPLES = {   # sizes around the 512-byte tar block, so padding is crossed
    "a": {"jpg": bytes(range(256)) * 3, "disp.png": b"\x89PNG" + b"d" * 507, "json": b'{"key": "a"}'},
    "b": {"png": b"p" * 512, "json": b'{"key": "b"}'},
}
STAMP = {"source_kind": "pseudo", "worker": "w1", "attempt": 1}


@pytest.fixture
def store(store_url):
    return open_store(store_url)


def row(key: str, status: str = "ok") -> dict:
    return {"key": key, "source": "in/s-1.tar", "status": status, "width": 4, "height": 3,
            "error": None if status == "ok" else "unreadable"}


def fill(sink: ShardSink) -> None:
    for key, members in SAMPLES.items():
        sink.add(key, members, row(key))
    sink.add("c", {}, row("c", "error"))   # an error row: no members in the tar


def test_commit_records_where_each_member_lies(store):
    with ShardSink(store, "s-1") as sink:
        fill(sink)
        assert sink.commit(STAMP, {"worker": "w1", "id": "x"}, ClaimPolicy.of(5)) is True

    data = store.get(layout.shard_key("s-1"))
    assert sink.tar_size == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        found = {m.name: (m.offset_data, tar.extractfile(m).read()) for m in tar.getmembers()}
    expected = {f"{k}.{ext}": body for k, members in SAMPLES.items() for ext, body in members.items()}
    assert {name: body for name, (_, body) in found.items()} == expected

    rows = decode_part(store.get(layout.manifest_key("s-1"))).to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c"] and rows[2]["members"] == []
    for r in rows:
        assert (r["shard"], r["tar_size"], r["source_kind"], r["worker"], r["attempt"]) == \
               ("s-1.tar", len(data), "pseudo", "w1", 1)
        assert r["labeled_at"] is not None
        for m in r["members"]:
            body = expected[m["name"]]
            assert m["offset"] == found[m["name"]][0] and m["size"] == len(body)
            assert data[m["offset"]:m["offset"] + m["size"]] == body
            assert store.read_range(layout.shard_key("s-1"), m["offset"], m["size"]) == body
            assert m["sha256"] == hashlib.sha256(body).hexdigest()
    assert [r["members"] for r in rows] == [r["members"] for r in sink.rows]


def nothing_written(store) -> bool:
    return not list(store.list(layout.SHARDS)) and not list(store.list(layout.MANIFEST))


def test_abort_leaves_nothing(store):
    with ShardSink(store, "s-1") as sink:
        fill(sink)
        sink.abort()
        with pytest.raises(ValueError, match="already committed or aborted"):
            sink.add("d", {"txt": b"late"}, row("d"))
    assert nothing_written(store)


def test_an_exception_inside_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="model failed"), ShardSink(store, "s-1") as sink:
        fill(sink)
        raise RuntimeError("model failed")
    assert nothing_written(store)
    with pytest.raises(ValueError, match="duplicate sample key"), ShardSink(store, "s-1") as sink:
        fill(sink)
        sink.add("a", {"txt": b"again"}, row("a"))
    assert nothing_written(store)


def test_a_second_commit_of_the_shard_is_fenced(store):
    with ShardSink(store, "s-1", mtime=0) as first:
        fill(first)
        assert first.commit(STAMP, {"worker": "w1", "id": "first"}, ClaimPolicy.of(5))
    tar, part = store.get(layout.shard_key("s-1")), store.get(layout.manifest_key("s-1"))

    with ShardSink(store, "s-1", mtime=1) as second:
        second.add("z", {"txt": b"another attempt"}, row("z"))
        assert second.commit({**STAMP, "worker": "w2"}, {"worker": "w2", "id": "second"}, ClaimPolicy.of(5)) is False
    assert store.get(layout.shard_key("s-1")) == tar
    assert store.get(layout.manifest_key("s-1")) == part
