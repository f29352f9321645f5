"""An S3 bucket prefix as an object store (AWS, Ceph RGW, MinIO, moto), over boto3.

Writes are multipart uploads completed only on commit, so an aborted or crashed writer never
makes a partial object visible; reads stream the GET body and resume with a ranged GET after a
dropped connection, because a labeler may consume one shard slowly for many minutes.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from .objectstore import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    WriterBase,
    check_key,
    check_prefix,
)
from .s3_client import (
    MAX_ATTEMPTS,
    arrow_s3_options,
    call,
    client,
    error_code,
    storage_error,
)

if TYPE_CHECKING:
    import pyarrow.fs

PART_SIZE = 16 * 1024 * 1024
LIST_PAGE_SIZE = 1000   # keys per LIST request (S3's most); tests lower it to cross pages
READ_BUFFER = 1024 * 1024
MAX_RESUMES = 5


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


class S3Reader(io.RawIOBase):
    """The GET body as a raw binary stream; a broken connection resumes at the current offset.

    The resumed response must carry the original ETag, so a reader never splices two versions.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        super().__init__()
        self._bucket, self._key, self._url = store.bucket, store.full_key(key), store.url_of(key)
        response = call("open_read", self._url, client().get_object, Bucket=self._bucket, Key=self._key)
        self._body, self._etag = response["Body"], response.get("ETag")
        self._size, self._pos = response["ContentLength"], 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        if self._pos >= self._size:
            return 0
        view = memoryview(buffer).cast("B")
        for attempt in range(MAX_RESUMES + 1):
            try:
                data = self._body.read(len(view))
            except (BotoCoreError, HTTPError, ConnectionError) as e:
                error: Exception = e
            else:
                if data:
                    break
                error = StorageError(f"stream ended at byte {self._pos} of {self._size}")
            if attempt == MAX_RESUMES:
                raise storage_error("read", self._url, error) from error
            time.sleep(min(0.1 * 2**attempt, 2.0))
            self._resume()
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _resume(self) -> None:
        self._body.close()
        response = call(
            "read", self._url, client().get_object,
            Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-",
        )
        if response.get("ETag") != self._etag:
            response["Body"].close()
            raise StorageError(f"read {self._url}: object changed while it was being read")
        self._body = response["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Writer(WriterBase):
    """Multipart upload in parts of `part_size`, holding at most one part in memory.

    Fewer bytes than one part at commit go up as a single PutObject (no multipart at all).
    `peak_buffer` records the largest buffer ever held, so tests can check the bound.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        super().__init__(store.url_of(key))
        self._bucket, self._key, self._relative = store.bucket, store.full_key(key), key
        self.part_size = store.part_size
        self._buffer = bytearray()
        self.peak_buffer = 0
        self._parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None

    def _write(self, data: memoryview) -> int:
        pos = 0
        while pos < len(data):
            take = min(self.part_size - len(self._buffer), len(data) - pos)
            self._buffer += data[pos : pos + take]
            pos += take
            self.peak_buffer = max(self.peak_buffer, len(self._buffer))
            if len(self._buffer) >= self.part_size:
                self._upload_part()
        return len(data)

    def _upload_part(self) -> None:
        s3 = client()
        if self.upload_id is None:
            response = call(
                "open_write", self.label, s3.create_multipart_upload, Bucket=self._bucket, Key=self._key
            )
            self.upload_id = response["UploadId"]
        body, self._buffer = bytes(self._buffer), bytearray()
        number = len(self._parts) + 1
        response = call(
            "write", self.label, s3.upload_part,
            Bucket=self._bucket, Key=self._key, UploadId=self.upload_id, PartNumber=number, Body=body,
        )
        # Newer botocore checksums each part; completion must then list the same checksums.
        checksums = {k: v for k, v in response.items() if k.startswith("Checksum") and k != "ChecksumType"}
        self._parts.append({"PartNumber": number, "ETag": response["ETag"], **checksums})

    def _commit(self) -> ObjectInfo:
        s3 = client()
        if self.upload_id is None:
            call("commit", self.label, s3.put_object, Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._upload_part()
            call(
                "commit", self.label, s3.complete_multipart_upload,
                Bucket=self._bucket, Key=self._key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._buffer = bytearray()
        # Ceph's CompleteMultipartUpload answers with an empty ETag: ask for the real one.
        response = call("commit", self.label, s3.head_object, Bucket=self._bucket, Key=self._key)
        return _info(self._relative, response)

    def _abort(self) -> None:
        self._buffer = bytearray()
        if self.upload_id is None:
            return
        try:
            call(
                "abort", self.label, client().abort_multipart_upload,
                Bucket=self._bucket, Key=self._key, UploadId=self.upload_id,
            )
        except StorageError as e:
            if e.code not in ("NoSuchUpload", "404"):  # already gone: abort is idempotent
                raise


def _info(key: str, response: dict[str, Any]) -> ObjectInfo:
    modified = response.get("LastModified")
    return ObjectInfo(
        key, response["ContentLength"], _etag(response.get("ETag")),
        modified.timestamp() if modified else None,
    )


@dataclass(frozen=True, slots=True)
class S3Store:
    """Objects under s3://bucket/prefix; holds configuration only (picklable)."""

    bucket: str
    prefix: str = ""  # '' or ending with '/'
    part_size: int = PART_SIZE

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"invalid bucket name {self.bucket!r}")
        if self.prefix and not self.prefix.endswith("/"):
            raise ValueError(f"S3Store prefix must be empty or end with '/', got {self.prefix!r}")
        check_prefix(self.prefix)
        if self.part_size < 5 * 1024 * 1024:
            raise ValueError("S3 multipart parts must be at least 5 MiB")

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def full_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def child(self, prefix: str) -> S3Store:
        prefix = check_prefix(prefix).strip("/")
        if not prefix:
            return self
        return S3Store(self.bucket, f"{self.prefix}{prefix}/", self.part_size)

    def open_read(self, key: str) -> BinaryIO:
        return io.BufferedReader(S3Reader(self, key), buffer_size=READ_BUFFER)  # type: ignore[return-value]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length), fewer at the end of the object (b'' past it)."""
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        if length == 0:
            if self.info(key) is None:
                raise ObjectNotFound(f"read_range {self.url_of(key)}: no such object")
            return b""
        try:
            response = call(
                "read_range", self.url_of(key), client().get_object,
                Bucket=self.bucket, Key=self.full_key(key), Range=f"bytes={start}-{start + length - 1}",
            )
        except StorageError as e:
            if e.code == "InvalidRange":  # start at or past the end of the object
                return b""
            raise
        with response["Body"] as body:
            return body.read()

    def get(self, key: str) -> bytes:
        response = call("get", self.url_of(key), client().get_object, Bucket=self.bucket, Key=self.full_key(key))
        with response["Body"] as body:
            return body.read()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Atomic PutObject; if_absent sends If-None-Match: * and reports 412 as False."""
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        body = data if isinstance(data, bytes) else bytes(data)
        for attempt in range(5):
            try:
                client().put_object(Bucket=self.bucket, Key=self.full_key(key), Body=body, **extra)
                return True
            except ClientError as e:
                code, status = error_code(e)
                if if_absent and (status == 412 or code == "PreconditionFailed"):
                    return False
                # AWS answers 409 when a concurrent conditional write is in flight: retry.
                if code != "ConditionalRequestConflict" or attempt == 4:
                    raise storage_error("put", self.url_of(key), e) from e
                time.sleep(0.05 * 2**attempt)
            except BotoCoreError as e:
                raise storage_error("put", self.url_of(key), e) from e
        raise AssertionError("unreachable")

    def open_write(self, key: str) -> S3Writer:
        return S3Writer(self, key)

    def list(self, prefix: str = "", *, start_after: str | None = None,
             stop_after: str | None = None) -> Iterator[ObjectInfo]:
        """Recursive and sorted (S3 lists in UTF-8 key order); directory markers are skipped.
        A range starts on the server (StartAfter) and stops paginating past ``stop_after``."""
        from botocore.exceptions import BotoCoreError, ClientError

        check_prefix(prefix)
        ranged = {"StartAfter": self.prefix + start_after} if start_after is not None else {}
        pages = client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, **ranged,
            PaginationConfig={"PageSize": LIST_PAGE_SIZE},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if stop_after is not None and key > stop_after:
                        return
                    if key and not key.endswith("/"):
                        modified = obj.get("LastModified")
                        yield ObjectInfo(
                            key, obj["Size"], _etag(obj.get("ETag")),
                            modified.timestamp() if modified else None,
                        )
        except (ClientError, BotoCoreError) as e:
            raise storage_error("list", self.url + prefix, e) from e

    def info(self, key: str) -> ObjectInfo | None:
        try:
            response = call("info", self.url_of(key), client().head_object, Bucket=self.bucket, Key=self.full_key(key))
        except FileNotFoundError:
            return None
        return _info(key, response)

    def delete(self, key: str) -> None:
        call("delete", self.url_of(key), client().delete_object, Bucket=self.bucket, Key=self.full_key(key))

    def abort_incomplete(self, prefix: str, before: float) -> int:
        """Abort multipart uploads under `prefix` initiated before `before` (epoch seconds):
        the orphans of writers that died. Returns how many were aborted."""
        full = self.prefix + check_prefix(prefix)
        pages = client().get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
        n = 0
        for page in pages:
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() < before:
                    call("abort_incomplete", f"s3://{self.bucket}/{up['Key']}", client().abort_multipart_upload,
                         Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        return n

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """pyarrow's S3 filesystem on the same endpoint; credentials come from its default chain.

        Delayed open lets a small file (a manifest part) go up as one PutObject instead of a
        three-request multipart upload that a dying worker could leave behind.
        """
        import pyarrow.fs

        fs = pyarrow.fs.S3FileSystem(
            **arrow_s3_options(),
            allow_delayed_open=True,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        )
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")
