"""The ListObjectsV2 fast path (storage.s3_pages, a botocore before-parse hook) gives exactly
what a plain boto3 client gives: keys (url-decoded, odd characters included), sizes, ETags and
times, page after page and from a StartAfter; and an error response still reads as botocore's."""
from __future__ import annotations

import pytest

from storage import s3 as s3_module
from storage.objectstore import StorageError
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
