"""Blobs in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph): ``s3://bucket/prefix/ab/cd/<sha256>``.

Settings come from the arguments, the URI's query (``s3://bucket/prefix?endpoint_url=http://host:8333&region=x``)
or the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, profiles). The bucket is checked when the store opens, so an unreachable
server, refused credentials or a missing bucket fail at once with an error that says what to fix.

Writes: a put first asks whether the key exists (HEAD). A new blob is sent with ``If-None-Match: *`` (a
concurrent writer of the same bytes wins harmlessly) and its sha256 as ``x-amz-checksum-sha256``, so the server
rejects bytes damaged on the way; blobs from ``multipart_threshold`` (64 MiB) up go as parallel multipart uploads.

Modification time and gc: S3 cannot touch an object, so putting bytes that already exist refreshes their
``LastModified`` with a server-side copy onto itself (no bytes travel), when the object is older than
``refresh_after`` seconds (default 0: always, as the file store does, which keeps ``release_blobs``' check of a
re-put blob exact; raise it to save copies of large blobs at the cost of that check). S3 stamps whole seconds, so
``stat`` and ``list`` report the end of that second: a blob is never seen as older than it is. An existing object
of the wrong size (truncated, zero-length) is replaced by the put rather than trusted; one of the right size is
not read back (that would cost a download). Server and client
clocks must agree to within the grace period that ``gc`` is given.

Reads verify the sha256 (IntegrityError on mismatch). A local read cache is not this module's: ``open_blobs`` wraps
the store in a :class:`~mlwarehouse.blobs.cache.CachedBlobStore` when the URI has ``cache_dir=/local/folder``.
Every botocore/boto3 error is translated in one place, :func:`map_error`, at one boundary, :meth:`_boundary`.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import BinaryIO
from urllib.parse import parse_qs, urlparse

from mlwarehouse.blobs.base import BlobInfo, BlobStore, blob_key
from mlwarehouse.blobs.common import STALE_TMP_S, HashingReader, copy_hashed, fanout, fanout_key, verified
from mlwarehouse.errors import BackendError, ConfigError, IntegrityError, NotFound, Unavailable, WarehouseError
from mlwarehouse.ids import utc_now

try:
    import boto3
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore import exceptions as bx
    from botocore.config import Config
except ImportError as exc:  # pragma: no cover - boto3 is an optional dependency
    raise ConfigError("s3:// blob stores need boto3: pip install 'mlwarehouse[s3]'") from exc

__all__ = ["S3BlobStore", "map_error"]

_DRIVER_ERRORS = (bx.ClientError, bx.BotoCoreError, Boto3Error)
_MAX_COPY = 5 << 30  # the largest object a single CopyObject accepts
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed"}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException",
               "RequestLimitExceeded", "InternalError", "503", "500"}
_CONFIG_ERRORS = (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                  bx.NoAuthTokenError, bx.TokenRetrievalError, bx.SSOError, bx.LoginError, bx.ProfileNotFound,
                  bx.UnknownCredentialError, bx.RefreshWithMFAUnsupportedError, bx.MetadataRetrievalError,
                  bx.InvalidConfigError, bx.BaseEndpointResolverError, bx.EndpointProviderError,
                  bx.InvalidRegionError, bx.InvalidS3AddressingStyleError, bx.InvalidDNSNameError)
_UNREACHABLE = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)  # timeouts, refused, cut short


def _code(exc: bx.ClientError) -> tuple[str, int | None]:
    """The error code and HTTP status of a ClientError."""
    return (str(exc.response.get("Error", {}).get("Code", "")),
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def map_error(exc: BaseException, *, endpoint: str, bucket: str, access_key: str | None = None,
              key: str | None = None) -> WarehouseError:
    """Translate a botocore/boto3 exception into the mlwarehouse error tree (the one place that does)."""
    where = f"s3://{bucket} at {endpoint}"
    if isinstance(exc, Boto3Error) and isinstance(exc.__cause__, _DRIVER_ERRORS):
        return map_error(exc.__cause__, endpoint=endpoint, bucket=bucket, access_key=access_key, key=key)
    if isinstance(exc, bx.ClientError):
        code, status = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        detail = f"{exc.operation_name}: {code} {message}".strip()
        if code == "NoSuchBucket" or (exc.operation_name == "HeadBucket" and (code in ("404", "NotFound")
                                                                            or status == 404)):
            return ConfigError(f"the bucket {bucket!r} does not exist at {endpoint}: create it (for example "
                               f"`aws s3 mb s3://{bucket} --endpoint-url {endpoint}`) or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"blob {key} not found in {where}" if key else f"not found in {where} ({detail})")
        if code in _CREDENTIAL_CODES or status in (401, 403):
            return Unavailable(f"{where} refused the access key id {access_key!r} ({detail}): check the "
                               f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or access_key / "
                               f"secret_key) and the bucket's permissions")
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return IntegrityError(f"{where} received bytes that do not match their checksum ({detail})")
        if code in _BUSY_CODES or (status or 0) >= 500:
            return Unavailable(f"{where} failed after retries ({detail}): the server is overloaded or down")
        return BackendError(f"S3 request failed at {where} ({detail})")
    if isinstance(exc, _CONFIG_ERRORS):
        return ConfigError(f"S3 settings for {where} are incomplete or wrong: {exc} (set AWS_ACCESS_KEY_ID, "
                           f"AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION or pass them to the store)")
    if isinstance(exc, (bx.FlexibleChecksumError, bx.ChecksumError)):
        return IntegrityError(f"bytes from {where} failed their transfer checksum: {exc}")
    if isinstance(exc, _UNREACHABLE):
        return Unavailable(f"cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}: {exc}): check the "
                           f"endpoint_url / AWS_ENDPOINT_URL and that the server is running")
    return BackendError(f"S3 error at {where}: {type(exc).__name__}: {exc}")


_session_lock = threading.Lock()
_session = None


def _shared_client(**options):
    """An S3 client from one shared session (creating clients is not thread-safe; the service model is cached)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **options)


def _mtime(stamp: datetime) -> float:
    """LastModified as epoch seconds; whole-second stamps are moved to the end of their second (never too old)."""
    seconds = stamp.timestamp()
    return seconds + 1.0 if stamp.microsecond == 0 else seconds


class S3BlobStore(BlobStore):
    """Content-addressed blobs in ``s3://bucket/prefix``; see the module notes for writes and mtimes."""

    name = "s3"
    mtime_resolution = 1.0  # LastModified has whole seconds

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, multipart_threshold: int = 64 << 20,
                 refresh_after: float = 0.0, connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_attempts: int = 4, check: bool = True):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"not an S3 URI: {uri!r} (write s3://bucket/prefix)")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise ConfigError(f"unknown S3 URI parameter(s) {sorted(unknown)} in {uri!r}; known: endpoint_url, "
                              f"region (credentials come from the environment; cache_dir is read by open_blobs, "
                              f"which wraps the store in a CachedBlobStore)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        endpoint_url = (endpoint_url or query.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
        region = (region or query.get("region") or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.multipart_threshold = multipart_threshold
        self.refresh_after = refresh_after
        self._conditional = True  # If-None-Match and sha256 checksums, until a server says it has neither
        self.endpoint = endpoint_url or "AWS S3"
        self.access_key_id: str | None = None
        try:
            config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                            connect_timeout=connect_timeout, read_timeout=read_timeout, max_pool_connections=32,
                            s3={"addressing_style": "path"} if endpoint_url else None)
            if access_key and secret_key:  # a shared session keeps the parsed service model: clients open fast
                self.access_key_id = access_key
                self._client = _shared_client(endpoint_url=endpoint_url, region_name=region, config=config,
                                              aws_access_key_id=access_key, aws_secret_access_key=secret_key)
            else:  # profiles, environment, roles: a session of its own, whose credentials may refresh
                session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                                region_name=region)
                credentials = session.get_credentials()
                if credentials is None:
                    raise ConfigError(f"no S3 credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and "
                                      f"AWS_SECRET_ACCESS_KEY (or a profile), or pass access_key and secret_key")
                self.access_key_id = credentials.access_key
                self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc
        self.endpoint = self._client.meta.endpoint_url
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=16 << 20,
                                        max_concurrency=4)
        if check:
            with self._boundary():
                self._client.head_bucket(Bucket=self.bucket)

    def __repr__(self) -> str:
        return f"S3BlobStore('s3://{self.bucket}/{self.prefix}', endpoint_url={self.endpoint!r})"

    def _name(self, key: str) -> str:
        return f"{self._root}{fanout(key)}"

    def _error(self, exc: BaseException, key: str | None = None) -> WarehouseError:
        return map_error(exc, endpoint=self.endpoint, bucket=self.bucket, access_key=self.access_key_id, key=key)

    @contextmanager
    def _boundary(self, key: str | None = None):
        """Every driver call runs in here, so that no botocore/boto3 error escapes untranslated."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise self._error(exc, key) from exc

    # -- writing ---------------------------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> str:
        key = blob_key(data)
        found = self._refresh_if_exists(key, memoryview(data).nbytes)
        if found is True:
            return key
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        if len(body) >= self.multipart_threshold:
            self._upload(key, io.BytesIO(body))
        else:
            self._put_object(key, body, replace=found is None)
        return key

    def _put_stream(self, source: BinaryIO) -> tuple[str, int]:
        """Stream a file object to the bucket; returns ``(key, size)``.

        The key must be known before the upload, so the file is hashed first (a stream that cannot seek is
        spooled to a temporary file on the way), then sent; what is sent is hashed again, and nothing is kept if
        the file changed in between.
        """
        seekable = getattr(source, "seekable", lambda: False)()
        spool = None if seekable else tempfile.TemporaryFile()
        try:
            start = source.tell() if seekable else 0
            key, size = copy_hashed(source, spool)
            stream = source if spool is None else spool
            stream.seek(start)
            found = self._refresh_if_exists(key, size)
            if found is True:
                return key, size
            reader = HashingReader(stream)
            changed = IntegrityError(f"the file changed while it was stored in s3://{self.bucket}; nothing kept")
            if size < self.multipart_threshold:
                body = reader.read(size)
                if reader.hexdigest() != key:
                    raise changed
                self._put_object(key, body, replace=found is None)
                return key, size
            self._upload(key, reader)
            if reader.hexdigest() != key:
                self.delete(key)
                raise changed
            return key, size
        finally:
            if spool is not None:
                spool.close()

    def _put_object(self, key: str, body: bytes | bytearray, *, replace: bool = False) -> None:
        """Send one object; ``replace`` overwrites a damaged one (no ``If-None-Match``, still checksummed)."""
        args = {"Bucket": self.bucket, "Key": self._name(key), "Body": body}
        if self._conditional:
            args.update(ChecksumSHA256=base64.b64encode(bytes.fromhex(key)).decode())
            if not replace:
                args.update(IfNoneMatch="*")
        retry = False
        with self._boundary(key):
            try:
                self._client.put_object(**args)
            except bx.ClientError as exc:
                code, status = _code(exc)
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                    return  # another writer stored these same bytes a moment ago
                if not ("IfNoneMatch" in args and (code == "NotImplemented" or status == 501)):
                    raise
                self._conditional, retry = False, True  # a server without conditional puts: plain ones
        if retry:
            self._put_object(key, body)

    def _upload(self, key: str, stream: BinaryIO) -> None:
        with self._boundary(key):
            self._client.upload_fileobj(stream, self.bucket, self._name(key), Config=self._transfer)

    def _refresh_if_exists(self, key: str, size: int) -> bool | None:
        """Refresh LastModified of an existing blob (gc's grace period): True; False if it is not there; None
        if the object there has another size (truncated, or zero-length after a crash): it is to be replaced."""
        try:
            head = self._head(key)
        except NotFound:
            return False
        if head["ContentLength"] != size:
            return None
        if time.time() - head["LastModified"].timestamp() < self.refresh_after:
            return True
        name = self._name(key)
        source = {"Bucket": self.bucket, "Key": name}
        touched = {"MetadataDirective": "REPLACE", "Metadata": {"mlw-touched": utc_now()}}
        try:
            with self._boundary(key):
                if head["ContentLength"] <= _MAX_COPY:
                    self._client.copy_object(Bucket=self.bucket, Key=name, CopySource=source, **touched)
                else:
                    self._client.copy(source, self.bucket, name, ExtraArgs={"Metadata": touched["Metadata"]},
                                      Config=self._transfer)
        except NotFound:  # deleted between the HEAD and the copy: store it again
            return False
        return True

    # -- reading ---------------------------------------------------------------------------------------------

    def _head(self, key: str) -> dict:
        name = self._name(key)
        with self._boundary(key):
            return self._client.head_object(Bucket=self.bucket, Key=name)

    def get(self, key: str) -> bytes:
        name = self._name(key)
        with self._boundary(key):
            data = self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        return verified(key, data, f"s3://{self.bucket}/{name}")

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        name = self._name(key)
        if length == 0:
            self._head(key)  # NotFound when missing, as for any other length
            return b""
        with self._boundary(key):
            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=name,
                                                Range=f"bytes={start}-{start + length - 1}")
            except bx.ClientError as exc:
                code, status = _code(exc)
                if code == "InvalidRange" or status == 416:  # start is at or past the end
                    return b""
                raise
            data = reply["Body"].read()
        return data if "ContentRange" in reply else data[start:start + length]  # a server that ignored Range

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except NotFound:  # missing, or not a key: nothing can be stored under it
            return False

    def stat(self, key: str) -> BlobInfo:
        head = self._head(key)
        return BlobInfo(key, head["ContentLength"], _mtime(head["LastModified"]))

    def delete(self, key: str) -> bool:
        name = self._name(key)
        if not self.exists(key):
            return False
        with self._boundary(key):
            self._client.delete_object(Bucket=self.bucket, Key=name)
        return True

    def list(self) -> Iterator[BlobInfo]:
        """Every blob under the prefix, page by page; aborts multipart uploads left for over an hour."""
        self._abort_stale_uploads()
        with self._boundary():
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._root):
                for obj in page.get("Contents", ()):
                    parts = obj["Key"][len(self._root):].split("/")
                    if len(parts) == 3 and (key := fanout_key(*parts)):
                        yield BlobInfo(key, obj["Size"], _mtime(obj["LastModified"]))

    def _abort_stale_uploads(self) -> None:
        stale_before = time.time() - STALE_TMP_S
        with self._boundary():
            try:
                pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                      Prefix=self._root)
                for page in pages:
                    for upload in page.get("Uploads", ()):
                        if upload["Initiated"].timestamp() < stale_before:
                            self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                                UploadId=upload["UploadId"])
            except bx.ClientError as exc:
                if _code(exc)[0] != "NotImplemented":  # a server without the call simply has nothing to clean
                    raise

    def close(self) -> None:
        self._client.close()
