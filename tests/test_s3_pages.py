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


NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
ITEM = ("<Contents><Key>{key}</Key><LastModified>2026-12-01T18:50:00.000Z</LastModified>"
        "<ETag>&quot;abc&quot;</ETag><Size>{size}</Size><Owner><ID>o</ID></Owner>"
        "<StorageClass>STANDARD</StorageClass><Type>Normal</Type></Contents>")
PAGES = {   # every form a server may answer with: keys url-encoded or XML-escaped, namespaced or not
    "url-encoded": f'<ListBucketResult {NS}><Name>b</Name><Prefix>p%2F</Prefix><EncodingType>url</EncodingType>'
                   f'<KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>'
                   + ITEM.format(key="p%2Fa%20b%26c", size=1) + ITEM.format(key="p%2F%C3%A9", size=22)
                   + "<CommonPrefixes><Prefix>p%2Fdir%2F</Prefix></CommonPrefixes></ListBucketResult>",
    "not encoded": f'<ListBucketResult {NS}><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount>'
                   f'<MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>'
                   f'<NextContinuationToken>t1</NextContinuationToken>'
                   + ITEM.format(key="p/a &amp; b&lt;c", size=3) + ITEM.format(key="p/100%", size=4)
                   + "</ListBucketResult>",
    "no namespace": "<ListBucketResult><Name>b</Name><Prefix>p/</Prefix><KeyCount>1</KeyCount>"
                    "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
                    + ITEM.format(key="p/x", size=5) + "</ListBucketResult>",
    "empty": f'<ListBucketResult {NS}><Name>b</Name><Prefix>q/</Prefix><KeyCount>0</KeyCount>'
             f'<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>',
}


@pytest.mark.parametrize("form", sorted(PAGES))
def test_every_page_form_reads_as_botocore_reads_it(form, monkeypatch):
    """The same reply through the engine's client and through a plain boto3 client (botocore's
    own parse and key decoding, the independent reference): the same paging fields, and the
    same Key, Size, ETag, StorageClass and instant of each object (Owner and Type are dropped)."""
    import boto3
    from botocore.awsrequest import AWSResponse

    import storage.s3_client as s3_client

    body = ('<?xml version="1.0" encoding="UTF-8"?>' + PAGES[form]).encode()

    class Raw:
        def stream(self, *_, **__):
            yield body

    def reply(**_):
        return AWSResponse("http://127.0.0.1:9/b", 200, {"content-type": "application/xml"}, Raw())

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")     # never reached: the reply is canned
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    plain = boto3.session.Session().client("s3")
    mine = s3_client.client()
    got = {}
    for name, c in (("plain", plain), ("mine", mine)):
        c.meta.events.register_first("before-send.s3.ListObjectsV2", reply)
        try:
            r = c.list_objects_v2(Bucket="b", Prefix="p/")
        finally:
            c.meta.events.unregister("before-send.s3.ListObjectsV2", reply)
        r.pop("ResponseMetadata")
        r.pop("EncodingType", None)      # the hook's page says none: its keys come decoded already
        r["Contents"] = [(o["Key"], o["Size"], o["ETag"], o["StorageClass"], o["LastModified"].timestamp())
                         for o in r.get("Contents", [])]     # the members the hook promises
        got[name] = r
    assert got["mine"] == got["plain"]
    assert len(got["mine"]["Contents"]) == PAGES[form].count("<Contents>")
