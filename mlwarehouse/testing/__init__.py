"""Helpers for testing mlwarehouse and its backends: the conformance suites and the local test servers.

:mod:`.blob_conformance`, :mod:`.index_conformance`, :mod:`.views_conformance` (the SQL views),
:mod:`.warehouse_conformance` and :mod:`.collection_conformance` (users' collections; with
:mod:`.listener_conformance`, their listeners) hold the suites that each backend's tests subclass, on the
warehouses of :mod:`.backend_sets`. :mod:`.servers` starts and stops the local servers (SeaweedFS as the S3 store;
PostgreSQL in :mod:`.postgres_server`, a MongoDB-wire server in :mod:`.mongo_server`), all on the process helpers of
:mod:`.processes`. The suites and the fixtures need pytest.
"""
