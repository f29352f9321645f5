"""S3 retries counted apart from requests: through a proxy that answers every third request
503 SlowDown, the engine's S3 client retries; its counters must say how many requests it sent
and how many of them were retries, as the proxy counted them (an independent count)."""
from __future__ import annotations

from faulty_s3 import FaultyS3

from storage.s3_client import request_counts, retry_counts
from storage.stores import open_store


def _since(before: dict, after: dict) -> int:
    return sum(n - before.get(op, 0) for op, n in after.items())


def test_retries_are_the_requests_beyond_one_per_call(s3_server, monkeypatch):
    proxy = FaultyS3(s3_server.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        bucket = s3_server.bucket("retry")
        store = open_store(f"s3://{bucket}/p/")     # a client of its own: the endpoint is part of its key
        store.put("warm", b"x")
        proxy.faults(throttle_every=3)
        requests, retries, throttled, seen = request_counts(), retry_counts(), proxy.throttled, proxy.requests
        for i in range(6):
            store.put(f"k{i}", b"data")
            assert store.get(f"k{i}") == b"data"
        sent, retried = _since(requests, request_counts()), _since(retries, retry_counts())
        assert proxy.throttled - throttled >= 3
        assert sent == proxy.requests - seen                  # every request the proxy saw
        assert retried == proxy.throttled - throttled         # each 503 retried once, none besides
    finally:
        proxy.close()
