"""The ListObjectsV2 fast path (storage.s3_pages, a botocore before-parse hook) gives exactly
what a plain boto3 client gives: keys (url-decoded, odd characters included), sizes, ETags and
times, page after page and from a StartAfter; a page that says 200 but holds an S3 error or
stops mid-XML is retried, as botocore retries it, never read as a short listing; and an error
response still reads as botocore's."""
from __future__ import annotations

import pytest

from faulty_s3 import INTERNAL_ERROR, FaultyS3

from storage import s3 as s3_module
from storage import s3_pages
from storage.objectstore import StorageError
from storage.s3_client import client, retry_counts
from storage.stores import open_store

ODD = ["a b", "a+b", "a%20b", "100%", "é/ü", "tilde~", "q?x=1&y", "semi;colon", "dir/sub/x", "plain"]


def reference(client, bucket: str, prefix: str, start_after: str | None = None) -> list[tuple]:
    """A plain boto3 client's listing: botocore's own parse, no hook."""
    extra = {"StartAfter": prefix + start_after} if start_after else {}
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra,
                                                                  PaginationConfig={"PageSize": 4}):
        out += [(o["Key"][len(prefix):], o["Size"], o["ETag"].strip('"'), o["LastModified"].timestamp())
                for o in page.get("Contents", [])]
    return out


def test_listings_equal_a_plain_boto3_listing(s3_backend, monkeypatch):
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 3)         # many pages, continuation tokens
    bucket = s3_backend.bucket("pages")
    store = open_store(f"s3://{bucket}/p/")
    for i, key in enumerate(ODD + [f"k{i:03d}" for i in range(20)]):
        store.put(key, b"x" * i)
    plain = s3_backend.client()
    mine = [(o.key, o.size, o.etag, o.mtime) for o in store.list()]
    assert mine == reference(plain, bucket, "p/") and len(mine) == len(ODD) + 20
    assert {k for k, *_ in mine} >= set(ODD)                      # decoded once, not twice
    ranged = [(o.key, o.size, o.etag, o.mtime) for o in store.list("", start_after="a+b")]
    assert ranged == reference(plain, bucket, "p/", start_after="a+b")
    assert [o.key for o in store.list("dir/")] == ["dir/sub/x"]


def test_an_error_page_is_left_to_botocore(s3_backend):
    store = open_store(f"s3://no-such-bucket-{s3_backend.bucket('x')}-gone/p/")
    with pytest.raises(StorageError) as e:
        list(store.list())
    assert e.value.code == "NoSuchBucket"


def test_a_garbled_page_is_retried_not_read_short(s3_server, monkeypatch):
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 5)
    bucket = s3_server.bucket("garbled")
    keys = [f"k{i:03d}" for i in range(40)]
    direct = open_store(f"s3://{bucket}/p/")
    for key in keys:
        direct.put(key, b"x")
    proxy = FaultyS3(s3_server.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_store(f"s3://{bucket}/p/")      # a client of its own, through the proxy
        proxy.faults(garble_lists_every=2)           # every other page: an <Error>, then half the XML
        before = sum(retry_counts().values())
        assert [o.key for o in store.list()] == keys
        assert [o.key for o in store.list("", start_after="k017")] == keys[18:]
        assert proxy.garbled >= 8
        assert sum(retry_counts().values()) - before == proxy.garbled    # each garbled page retried once
    finally:
        proxy.close()


def test_other_operations_keep_botocores_200_error_check(s3_server):
    """The listing hook replaces botocore's check on the engine's client: every other S3 reply
    must still have it (DeleteObjects and CopyObject answer errors inside a 200)."""
    s3 = client()
    for operation in ("DeleteObjects", "CopyObject", "ListObjectsV2"):
        reply = {"status_code": 200, "body": INTERNAL_ERROR, "headers": {}}
        s3.meta.events.emit(f"before-parse.s3.{operation}", response_dict=reply, customized_response_dict={},
                            operation_model=s3.meta.service_model.operation_model(operation))
        assert reply["status_code"] == 500, operation


def test_keys_decoded_together_equal_keys_decoded_one_by_one():
    """A page's keys are url-decoded in one call; a key with an escaped newline, and escapes cut
    between two keys, must decode as each key alone does."""
    from urllib.parse import quote, unquote

    keys = [quote(k, safe="") for k in ODD + ["line\nbreak", "tab\tx", "émoji 🙂"]] + ["%C3", "%A9x", "plain", "%zz"]
    for page in (keys, [k for k in keys if "%0A" not in k]):
        contents = [{"Key": k} for k in page]
        s3_pages._decode_keys(contents)
        assert [c["Key"] for c in contents] == [unquote(k) for k in page]
