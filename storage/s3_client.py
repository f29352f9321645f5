"""One boto3 S3 client per process and configuration, and errors that never carry secrets.

Stores are pickled to Ray workers, so they hold no client: `client()` builds one lazily in the
process that needs it, from the standard AWS configuration only (environment and profiles).
The cache key includes the `AWS_*` environment, so a process (or a test) that switches endpoint
or credentials gets a matching client rather than a stale one.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from datetime import datetime
from typing import Any, Callable
from urllib.parse import urlsplit

from .objectstore import ObjectNotFound, StorageError, redact
from . import s3_pages

MAX_ATTEMPTS = 10  # boto3 (adaptive mode) and pyarrow alike; AWS_MAX_ATTEMPTS overrides it for boto3
MAX_POOL_CONNECTIONS = 32  # threaded uploads would otherwise churn the default pool of 10
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}

_lock = threading.Lock()
_clients: dict[tuple, Any] = {}


def _config_key() -> tuple:
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return (os.getpid(), env)


def client() -> Any:
    """The S3 client for this process and the current AWS configuration (thread-safe)."""
    key = _config_key()
    found = _clients.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _clients:
            import boto3
            import botocore.session
            from botocore.config import Config

            core = botocore.session.get_session()
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
            session = boto3.session.Session(botocore_session=core)
            # botocore reads AWS_DEFAULT_REGION itself; AWS_REGION is the newer spelling.
            region = os.environ.get("AWS_REGION") or None
            retries = {"mode": "adaptive"}  # a fresh dict: botocore edits it
            if not os.environ.get("AWS_MAX_ATTEMPTS"):  # the standard variable wins when set
                retries["max_attempts"] = MAX_ATTEMPTS
            config = Config(retries=retries, max_pool_connections=MAX_POOL_CONNECTIONS)
            s3 = session.client("s3", region_name=region, config=config)
            s3.meta.events.register("before-send.s3", _count_request)
            s3.meta.events.register("before-call.s3", _count_call)
            s3_pages.install(s3, parse_timestamp)
            _clients[key] = s3
        return _clients[key]


def parse_timestamp(value: Any) -> Any:
    """botocore's timestamp parse, with the ISO 8601 UTC form that S3 lists every object's
    LastModified in ('2026-12-01T18:50:00.000Z') read without dateutil: dateutil was most of
    the CPU of a listing (100,000 keys: about 4 s of 6.4). Same aware UTC datetime."""
    if isinstance(value, str) and value.endswith("Z") and "T" in value:
        try:
            return datetime.fromisoformat(value[:-1] + "+00:00")
        except ValueError:
            pass
    from botocore.utils import parse_timestamp as parse

    return parse(value)


def error_code(exc: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of a botocore ClientError; ('', None) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(response.get("Error", {}).get("Code") or status or ""), status


def storage_error(op: str, url: str, exc: BaseException) -> StorageError:
    """Map a boto3 failure to ObjectNotFound / StorageError naming the operation and object."""
    code, status = error_code(exc)
    if code in _NOT_FOUND:
        error: StorageError = ObjectNotFound(f"{op} {url}: no such object")
    elif code:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        detail = f": {message}" if message and message != code else ""  # Ceph echoes the code
        error = StorageError(redact(f"{op} {url}: {code} (HTTP {status}){detail}"))
    else:
        error = StorageError(redact(f"{op} {url}: {type(exc).__name__}: {exc}"))
    error.code = code or None
    return error


_REQUESTS: Counter = Counter()
_CALLS: Counter = Counter()
_REQUESTS_LOCK = threading.Lock()


def request_counts() -> dict[str, int]:
    """HTTP requests this process's S3 clients sent so far, by operation (GetObject, UploadPart,
    ...), retries included: what a job costs in S3 requests."""
    with _REQUESTS_LOCK:
        return dict(_REQUESTS)


def retry_counts() -> dict[str, int]:
    """Of those requests, the retries (throttling, 5xx, a cut connection), by operation: the
    requests sent beyond one per call made. A call in flight may not have sent yet, so an
    operation's count never goes below 0."""
    with _REQUESTS_LOCK:
        return {op: n - _CALLS[op] for op, n in _REQUESTS.items() if n > _CALLS[op]}


def _count_request(event_name: str = "", **_) -> None:
    """botocore's before-send hook (event ``before-send.s3.<Operation>``): one per request sent."""
    with _REQUESTS_LOCK:
        _REQUESTS[event_name.rsplit(".", 1)[-1]] += 1


def _count_call(event_name: str = "", **_) -> None:
    """botocore's before-call hook: one per API call, however many requests its retries send."""
    with _REQUESTS_LOCK:
        _CALLS[event_name.rsplit(".", 1)[-1]] += 1


def call(op: str, url: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one boto3 call, translating its errors (retries are botocore's, adaptive mode)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise storage_error(op, url, e) from e


def arrow_s3_options() -> dict[str, str]:
    """pyarrow.fs.S3FileSystem arguments from the same standard variables boto3 reads."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    options = {"region": region}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        options["scheme"] = parts.scheme
    return options
