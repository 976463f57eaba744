"""S3BlobStore against a local SeaweedFS: the blob conformance suite (plain, and behind the read cache), multipart,
the cache and error mapping."""

from __future__ import annotations

import os
import secrets
import time

import pytest

from mlwarehouse.testing.servers import ServerError, find_weed, in_ci, start_seaweedfs

if not in_ci():  # in CI a missing driver is an error, never a skip
    pytest.importorskip("boto3", reason="the S3 backend needs boto3 (pip install -e '.[s3]')")

import botocore.exceptions as bx  # noqa: E402
from boto3.exceptions import S3UploadFailedError  # noqa: E402

from mlwarehouse.blobs.base import blob_key  # noqa: E402
from mlwarehouse.blobs.cache import DEFAULT_CACHE_BYTES, CachedBlobStore  # noqa: E402
from mlwarehouse.blobs.s3 import S3BlobStore, map_error  # noqa: E402
from mlwarehouse.config import open_blobs  # noqa: E402
from mlwarehouse.errors import BackendError, ConfigError, IntegrityError, NotFound, Unavailable, WarehouseError  # noqa: E402
from mlwarehouse.testing.blob_conformance import BlobStoreTests  # noqa: E402


def make_store(s3_server, **options) -> S3BlobStore:
    """A store under a fresh prefix of the shared test bucket, so that every test starts empty."""
    uri = s3_server["uri"].replace("?", f"/t-{secrets.token_hex(6)}?", 1)
    return S3BlobStore(uri, access_key=s3_server["access_key"], secret_key=s3_server["secret_key"], **options)


def raw_client(store: S3BlobStore):
    return store._client


def corrupt_object(store: S3BlobStore, key: str, data: bytes = b"precious bytez") -> None:
    raw_client(store).put_object(Bucket=store.bucket, Key=store._name(key), Body=data)


class TestS3BlobStore(BlobStoreTests):
    large_size = 80 << 20  # above the 64 MiB multipart threshold
    mtime_resolution = 1.1  # S3 stamps whole seconds

    @pytest.fixture
    def store(self, s3_server):
        store = make_store(s3_server)
        yield store
        store.close()

    def corrupt(self, store, key, data=b"precious bytez"):
        corrupt_object(store, key, data)

    def test_layout_under_the_prefix(self, store):
        key = store.put(b"hello")
        head = raw_client(store).head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key[:2]}/{key[2:4]}/{key}")
        assert head["ContentLength"] == 5

    def test_large_blobs_go_as_multipart_uploads(self, s3_server):
        store = make_store(s3_server, multipart_threshold=8 << 20)
        data = os.urandom(1 << 20) * 10
        key = store.put(data)
        etag = raw_client(store).head_object(Bucket=store.bucket, Key=store._name(key))["ETag"]
        assert etag.strip('"').endswith("-1")  # one 16 MiB part: a multipart upload's ETag counts its parts
        assert store.get(key) == data

    def test_list_ignores_foreign_objects(self, store):
        key = store.put(b"kept")
        client = raw_client(store)
        for name in ("README", f"{key[:2]}/{key[2:4]}/not-a-key", f"zz/zz/{key}", f"{key[:2]}/{key[2:4]}/x/{key}"):
            client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{name}", Body=b"other")
        assert [i.key for i in store.list()] == [key]

    def test_list_pages_through_many_objects(self, s3_server, monkeypatch):
        store = make_store(s3_server)
        keys = {store.put(str(i).encode()) for i in range(25)}
        real = store._client.get_paginator

        def small_pages(name):
            paginator = real(name)
            original = paginator.paginate
            paginator.paginate = lambda **kw: original(**kw, PaginationConfig={"PageSize": 7})
            return paginator

        monkeypatch.setattr(store._client, "get_paginator", small_pages)
        assert {i.key for i in store.list()} == keys

    def test_refresh_after_skips_the_copy_for_young_blobs(self, s3_server):
        store = make_store(s3_server, refresh_after=3600)
        key = store.put(b"young")
        before = store.stat(key).mtime
        time.sleep(1.1)
        store.put(b"young")
        assert store.stat(key).mtime == before

    def test_uri_parameters_and_open_blobs(self, s3_server, monkeypatch, tmp_path):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
        store = open_blobs(s3_server["uri"].replace("?", "/via-config?", 1))
        assert isinstance(store, S3BlobStore) and store.prefix == "via-config"
        assert store.get(store.put(b"configured")) == b"configured"
        cached = open_blobs(s3_server["uri"].replace("?", f"/via-config?cache_dir={tmp_path / 'c'}&", 1))
        assert isinstance(cached, CachedBlobStore) and isinstance(cached.inner, S3BlobStore)
        assert (cached.root, cached.max_bytes) == (tmp_path / "c", DEFAULT_CACHE_BYTES)
        assert (cached.name, cached.prefix, cached.bucket) == ("s3", "via-config", store.bucket)  # as before
        assert cached.get(store.put(b"configured")) == b"configured" and cached.used_bytes() == 10
        with pytest.raises(ConfigError, match="secret_key"):
            S3BlobStore("s3://bucket/p?secret_key=oops")
        with pytest.raises(ConfigError, match="open_blobs"):
            S3BlobStore("s3://bucket/p?cache_dir=/somewhere")
        with pytest.raises(ConfigError, match="s3://bucket"):
            S3BlobStore("s3:///no-bucket")


class TestCachedS3BlobStore(BlobStoreTests):
    """The whole suite through the read cache: every blob read whole is then served from a local copy."""

    large_size = 80 << 20
    mtime_resolution = 1.1

    @pytest.fixture
    def store(self, s3_server, tmp_path):
        store = CachedBlobStore(make_store(s3_server), tmp_path / "cache")
        yield store
        store.close()

    def corrupt(self, store, key, data=b"precious bytez"):
        corrupt_object(store.inner, key, data)
        copy = store.root / key[:2] / key[2:4] / key
        if copy.exists():
            copy.write_bytes(data)

    def test_read_cache_serves_repeated_reads(self, store):
        data = os.urandom(300_000)
        key = store.put(data)
        assert store.get(key) == data
        cached = store.root / key[:2] / key[2:4] / key
        assert cached.read_bytes() == data
        corrupt_object(store.inner, key)  # the cache is content-addressed: a cached blob cannot go stale
        assert store.get(key) == data
        assert store.get_range(key, 10, 5) == data[10:15]
        cached.write_bytes(b"rotten")  # a damaged cache entry is dropped and the server is asked again
        with pytest.raises(IntegrityError):
            store.get(key)
        assert not cached.exists()
        assert store.delete(key) and not cached.exists()

    def test_read_cache_stays_within_its_size(self, s3_server, tmp_path):
        store = CachedBlobStore(make_store(s3_server), tmp_path / "small", max_bytes=1 << 20)
        keys = [store.put(os.urandom(200_000)) for _ in range(8)]
        for key in keys:
            store.get(key)
        cached = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file() and
                     not p.name.startswith("."))
        assert 0 < cached <= 1 << 20


class TestBadSettings:
    """Unreachable server, refused credentials, missing bucket: a clear error within seconds."""

    def test_unreachable_server(self):
        started = time.monotonic()
        with pytest.raises(Unavailable, match="127.0.0.1:9"):
            S3BlobStore("s3://bucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
        assert time.monotonic() - started < 10

    def test_wrong_credentials_name_the_key_id_not_the_secret(self, s3_server):
        uri = s3_server["uri"]
        with pytest.raises(Unavailable) as err:
            S3BlobStore(uri, access_key=s3_server["access_key"], secret_key="not-the-secret")
        assert s3_server["access_key"] in str(err.value) and "not-the-secret" not in str(err.value)
        assert "credentials" in str(err.value)
        with pytest.raises(Unavailable, match="nobody"):
            S3BlobStore(uri, access_key="nobody", secret_key="nothing")

    def test_missing_bucket(self, s3_server):
        uri = s3_server["uri"].replace("s3://mlw-test", "s3://no-such-bucket-here", 1)
        with pytest.raises(ConfigError, match="no-such-bucket-here.*create it"):
            S3BlobStore(uri, access_key=s3_server["access_key"], secret_key=s3_server["secret_key"])

    def test_no_credentials_at_all(self, monkeypatch, tmp_path):
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
            S3BlobStore("s3://bucket", endpoint_url="http://127.0.0.1:9")


def client_error(code: str, status: int, op: str = "GetObject") -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, op)


KEY = blob_key(b"k")
ERRORS = [
    (client_error("NoSuchKey", 404), NotFound, KEY),
    (client_error("404", 404, "HeadObject"), NotFound, KEY),
    (client_error("NoSuchBucket", 404), ConfigError, "create it"),
    (client_error("404", 404, "HeadBucket"), ConfigError, "does not exist"),
    (client_error("InvalidAccessKeyId", 403), Unavailable, "AKIDEXAMPLE"),
    (client_error("SignatureDoesNotMatch", 403), Unavailable, "credentials"),
    (client_error("AccessDenied", 403), Unavailable, "permissions"),
    (client_error("403", 403, "HeadBucket"), Unavailable, "AKIDEXAMPLE"),
    (client_error("ExpiredToken", 400), Unavailable, "credentials"),
    (client_error("BadDigest", 400, "PutObject"), IntegrityError, "checksum"),
    (client_error("SlowDown", 503, "PutObject"), Unavailable, "overloaded"),
    (client_error("InternalError", 500), Unavailable, "after retries"),
    (client_error("MalformedXML", 400), BackendError, "MalformedXML"),
    (bx.EndpointConnectionError(endpoint_url="http://h:1"), Unavailable, "http://h:1"),
    (bx.ConnectTimeoutError(endpoint_url="http://h:1"), Unavailable, "cannot reach"),
    (bx.ReadTimeoutError(endpoint_url="http://h:1"), Unavailable, "cannot reach"),
    (bx.ConnectionClosedError(endpoint_url="http://h:1"), Unavailable, "cannot reach"),
    (bx.ResponseStreamingError(error="reset"), Unavailable, "cannot reach"),
    (bx.IncompleteReadError(actual_bytes=1, expected_bytes=2), Unavailable, "cannot reach"),
    (bx.SSLError(endpoint_url="https://h", error="bad cert"), Unavailable, "cannot reach"),
    (bx.NoCredentialsError(), ConfigError, "AWS_ACCESS_KEY_ID"),
    (bx.PartialCredentialsError(provider="env", cred_var="secret"), ConfigError, "AWS_SECRET_ACCESS_KEY"),
    (bx.ProfileNotFound(profile="nope"), ConfigError, "nope"),
    (bx.NoRegionError(), ConfigError, "AWS_REGION"),
    (bx.FlexibleChecksumError(error_msg="crc mismatch"), IntegrityError, "crc mismatch"),
    (bx.ParamValidationError(report="bad Bucket"), BackendError, "bad Bucket"),
    (S3UploadFailedError("Failed to upload"), BackendError, "Failed to upload"),
]


@pytest.mark.parametrize("exc, mapped, words", ERRORS, ids=lambda v: getattr(v, "__name__", None))
def test_every_driver_error_is_mapped(exc, mapped, words):
    err = map_error(exc, endpoint="http://h:1", bucket="b", access_key="AKIDEXAMPLE", key=KEY)
    assert type(err) is mapped and words in str(err)


def test_boto3_wrappers_are_mapped_by_their_cause():
    wrapper = S3UploadFailedError("Failed to upload")
    wrapper.__cause__ = client_error("NoSuchBucket", 404, "CreateMultipartUpload")
    assert isinstance(map_error(wrapper, endpoint="e", bucket="b"), ConfigError)


def test_no_botocore_exception_class_escapes_the_tree():
    classes = [getattr(bx, n) for n in dir(bx)]
    for cls in classes:
        if isinstance(cls, type) and issubclass(cls, (bx.BotoCoreError, bx.ClientError)):
            try:
                exc = cls.__new__(cls)
                Exception.__init__(exc, "x")
                exc.kwargs = {}
                if issubclass(cls, bx.ClientError):
                    exc.response, exc.operation_name = {}, "Op"
            except TypeError:
                continue
            assert isinstance(map_error(exc, endpoint="e", bucket="b"), WarehouseError), cls


def test_a_server_that_cannot_start_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ServerError, match="exited with code"):
        start_seaweedfs(weed="/bin/false", timeout=5)
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MLW_WEED", str(fake))
    assert find_weed() == str(fake)
