"""Helpers for testing mlwarehouse and its backends: the blob conformance suite and local test servers.

``mlwarehouse.testing.blob_conformance.BlobStoreTests`` is subclassed by each blob backend's tests;
``mlwarehouse.testing.servers`` starts and stops local servers (SeaweedFS as the S3 store). Both need pytest.
"""
