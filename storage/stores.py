"""A URL to its store: the one place that knows both backends, so neither imports the other
nor the protocol module imports them. boto3 itself is imported by the S3 client only when
an S3 store first talks to its endpoint."""
from __future__ import annotations

import os

from .local import LocalStore
from .objectstore import (
    InvalidURL,
    ObjectStore,
    _object_key,
    _split_s3,
    is_s3,
    local_path,
)
from .s3 import S3Store


def open_store(url: str) -> ObjectStore:
    """A store rooted at `url`; local roots are made absolute and created on first write."""
    if is_s3(url):
        bucket, prefix = _split_s3(url)
        return S3Store(bucket).child(prefix)
    return LocalStore(local_path(url))


def locate(url: str) -> tuple[ObjectStore, str]:
    """The store holding one object, and the object's key in it."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        return S3Store(bucket), _object_key(url, key)
    if url.endswith("/"):
        raise InvalidURL(f"{url!r} names a directory, not an object")
    path = local_path(url)
    parent, name = os.path.split(path)
    return LocalStore(parent), _object_key(url, name)
