"""Shard headers and tables under corruption: every range read is exactly right or an IntegrityError.

Flips every bit of a small shard's prefix, header and tables one at a time and reads every item by range (the
path of ``ItemDataset.item`` and ``ItemRecord.load``); crafted headers with valid checksums; format-1 shards
(no checksums), which still read whole and, by range, through a whole verified read.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest

from mlwarehouse.datasets.items import SHARDS, ItemDatasets
from mlwarehouse.datasets.shardmemory import DecodedShards
from mlwarehouse.datasets.shards import MAGIC_V1, FieldSpec, build_shard, read_header
from mlwarehouse.datasets.stream import ShardReader
from mlwarehouse.datasets.wholeshard import Shard
from mlwarehouse.errors import IntegrityError, QueryError

PREFIX = struct.Struct("<8sIII")
N = 4


class Blobs:
    """One shard's bytes behind the two reads a ShardReader makes: ``get`` verified by sha256 (as every blob store
    does), ``get_range`` not (as none does)."""

    def __init__(self, data: bytes, digest: str):
        self.data, self.digest = data, digest

    def get(self, key: str) -> bytes:
        if hashlib.sha256(self.data).hexdigest() != self.digest:
            raise IntegrityError("blob fails its hash")
        return self.data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.data[start:start + length]


def _columns():
    rng = np.random.default_rng(1)
    return ({"x": rng.random((N, 3), dtype=np.float32),
             "r": [np.arange(i + 1, dtype=np.int16) for i in range(N)],
             "b": [bytes([65 + i]) * (i + 2) for i in range(N)],
             "t": [{"tag": f"t{i}", "k": i} for i in range(N)]},
            {"x": FieldSpec("array", "<f4", (3,)), "r": FieldSpec("array", "<i2", None),
             "b": FieldSpec("bytes"), "t": FieldSpec("json")})


def _same(got: dict, want: dict) -> bool:
    if set(got) != set(want):
        return False
    for name, value in want.items():
        other = got[name]
        if isinstance(value, np.ndarray):
            if not (isinstance(other, np.ndarray) and other.dtype == value.dtype and other.shape == value.shape
                    and np.array_equal(other, value)):
                return False
        elif type(other) is not type(value) or other != value:
            return False
    return True


def _as_v1(data: bytes) -> bytes:
    """The same shard in format 1: the old prefix (magic, header length), no checksums; offsets are relative."""
    _, head_len, _, _ = PREFIX.unpack_from(data)
    return struct.pack("<8sI", MAGIC_V1, head_len) + data[PREFIX.size:]


def _reseal(data: bytes, edit) -> bytes:
    """A crafted shard: the header JSON changed by ``edit`` and both checksums recomputed, so they pass."""
    _, head_len, _, _ = PREFIX.unpack_from(data)
    header = json.loads(data[PREFIX.size:PREFIX.size + head_len])
    table_len = sum((header["n"] + 1) * 8 + header["n"] * 4 + (f["blocks"] + 1) * 8 + f["blocks"]
                    for f in header["fields"].values())
    tables = data[PREFIX.size + head_len:PREFIX.size + head_len + table_len]
    rest = data[PREFIX.size + head_len + table_len:]
    edit(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    head_crc = zlib.crc32(head, zlib.crc32(len(head).to_bytes(4, "little")))
    return PREFIX.pack(b"MLWSHRD2", len(head), head_crc, zlib.crc32(tables)) + head + tables + rest


def _read_all(data: bytes, digest: str) -> list[dict]:
    reader = ShardReader(Blobs(data, digest), memory=DecodedShards(1 << 20))
    return [reader.item("k", row) for row in range(N)]


def _flip_every_bit(data: bytes, region: range) -> tuple[int, int]:
    """Reads every item of ``data`` with each bit of ``region`` flipped; returns (right, refused). Any other
    outcome (a wrong value, another exception) fails the test."""
    digest = hashlib.sha256(data).hexdigest()
    want = _read_all(data, digest)
    right = refused = 0
    for at in region:
        for bit in range(8):
            bad = bytearray(data)
            bad[at] ^= 1 << bit
            try:
                got = _read_all(bytes(bad), digest)
            except IntegrityError:
                refused += 1
                continue
            assert all(_same(g, w) for g, w in zip(got, want)), f"silently wrong after flipping byte {at} bit {bit}"
            right += 1
    return right, refused


def test_every_flipped_bit_of_header_and_tables_is_refused_on_the_range_path():
    data = build_shard(*_columns())
    header = read_header(lambda s, n: data[s:s + n])
    assert header.verified and data.startswith(b"MLWSHRD2")
    right, refused = _flip_every_bit(data, range(header.size))  # prefix, header JSON and every table
    assert refused == header.size * 8 and right == 0  # both checksums cover every byte
    payload = range(header.size, len(data))  # the items' own crc32s cover the payloads
    right, refused = _flip_every_bit(data, payload)
    assert refused == len(payload) * 8


def test_format_1_shards_still_read_and_never_return_wrong_data_by_range():
    columns, specs = _columns()
    data = _as_v1(build_shard(columns, specs))
    shard = Shard(data)  # the whole-shard path reads them as before
    np.testing.assert_array_equal(shard.column("x"), columns["x"])
    assert shard.column("t") == columns["t"] and not shard.header.verified
    digest = hashlib.sha256(data).hexdigest()
    got = _read_all(data, digest)  # range path: read whole (verified by the hash) instead
    assert _same(got[2], {name: col[2] for name, col in columns.items()})
    assert got[2]["t"] is not shard.column("t")[2]  # a copy: the cached column stays the shard's own
    header_end = read_header(lambda s, n: data[s:s + n]).size
    right, refused = _flip_every_bit(data, range(0, header_end, 3))
    assert right == 0 and refused > 0


@pytest.mark.parametrize("edit", [
    lambda h: h.update(n=-1),
    lambda h: h.update(n=10 ** 30),
    lambda h: h.update(n="4"),
    lambda h: h["fields"]["x"].update(dtype="O"),
    lambda h: h["fields"]["x"].update(dtype="not a dtype"),
    lambda h: h["fields"]["x"].update(dtype="<f8"),
    lambda h: h["fields"]["x"].update(shape=[-3]),
    lambda h: h["fields"]["x"].update(shape=7),
    lambda h: h["fields"]["x"].update(kind="pickle"),
    lambda h: h["fields"]["x"].update(raw=10 ** 12),
    lambda h: h["fields"]["x"].update(blocks="1"),
    lambda h: h["fields"]["x"].update(table=10 ** 9),
    lambda h: h["fields"]["x"].pop("payload"),
    lambda h: h["fields"]["r"].update(shapes=[[-1]] * N),
    lambda h: h["fields"]["r"].update(shapes=[[1, 2, 3]] * N),
    lambda h: h["fields"]["r"].update(shapes=None),
    lambda h: h["fields"]["b"].update(payload=10 ** 9),
    lambda h: h.update(fields=[]),
    lambda h: h.update(fields={"x": 5}),
])
def test_crafted_headers_with_valid_checksums_are_integrity_errors(edit):
    columns, specs = _columns()
    intact = _reseal(build_shard(columns, specs), lambda h: None)
    assert _same(_read_all(intact, "")[1], {name: col[1] for name, col in columns.items()})
    data = _reseal(build_shard(columns, specs), edit)
    for read in (lambda: _read_all(data, hashlib.sha256(data).hexdigest()), lambda: Shard(data).decode()):
        with pytest.raises(IntegrityError) as err:
            read()
        assert "checksum" not in str(err.value)  # refused by the layout checks, not by a checksum


def test_rows_outside_the_shard_are_refused():
    data = build_shard(*_columns())
    reader = ShardReader(Blobs(data, hashlib.sha256(data).hexdigest()))
    for row in (-1, N, 10 ** 20, "1", 1.0, True):
        with pytest.raises(IntegrityError, match="not in this shard"):
            reader.item("k", row)
    with pytest.raises(QueryError, match="no field"):
        reader.item("k", 0, ["nope"])
    v1 = _as_v1(data)
    reader = ShardReader(Blobs(v1, hashlib.sha256(v1).hexdigest()), memory=DecodedShards(1 << 20))
    with pytest.raises(IntegrityError, match="not in shard"):
        reader.item("k", -1)
    with pytest.raises(QueryError, match="no field"):
        reader.item("k", 0, ["nope"])


def test_a_flipped_header_bit_in_a_stored_shard_fails_item_and_load(wh):
    items = ItemDatasets(wh.project("p"))
    ds = items.from_arrays("h", {"x": np.arange(40, dtype=np.float32).reshape(20, 2), "label": np.arange(20)})
    record = ds.find({"label": 7})[0]
    assert record.load()["label"] == 7
    key = wh.project("p").find(SHARDS, {})[0]["shard"]
    path = wh.blobs._path(key)
    data = bytearray(path.read_bytes())
    data[PREFIX.size + 30] ^= 0x04  # inside the header JSON
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    fresh = ItemDatasets(wh.project("p")).get("h")  # no header cached yet
    with pytest.raises(IntegrityError):
        fresh.item(record.doc["_id"])
    with pytest.raises(IntegrityError):
        fresh.find({"label": 7})[0].load()


def _mixed_column(blocks: int = 10) -> np.ndarray:
    """Items of 4 KiB whose 256 KiB blocks alternate between compressible (zeros and a counter) and random
    bytes, so a column holds runs of compressed and of stored blocks."""
    rng = np.random.default_rng(5)
    x = np.zeros((blocks * 64, 4096), np.uint8)
    for b in range(1, blocks, 2):
        x[b * 64:(b + 1) * 64] = rng.integers(0, 256, (64, 4096), np.uint8)
    x[:, 0] = np.arange(len(x)) % 251
    return x


def test_a_column_of_mixed_blocks_decodes_whole_and_by_range_in_parallel():
    x = _mixed_column()
    data = build_shard({"x": list(x)}, {"x": FieldSpec("array", "|u1", (4096,))})
    layout = read_header(lambda s, n: data[s:s + n]).fields["x"]
    assert 0 < layout.flags.sum() < len(layout.flags) >= 4  # both kinds, and enough blocks to decode in parts
    assert np.array_equal(Shard(data).column("x"), x)
    reader = ShardReader(Blobs(data, hashlib.sha256(data).hexdigest()))
    for row in (0, 63, 64, 300, len(x) - 1):
        assert np.array_equal(reader.item("k", row)["x"], x[row])


def test_a_compressed_block_that_records_another_size_is_refused_though_its_run_adds_up(monkeypatch):
    """Two neighbouring frames of one run cut 100 bytes off one block and add them to the next: the run still
    decompresses to its total, so each frame's recorded size is what catches it (the shard's checksum would,
    for damage; a writer that crafts it gets an IntegrityError, not shifted items)."""
    import zstandard

    from mlwarehouse.datasets import shards as shards_module
    x = np.zeros((10 * 64, 4096), np.uint8)
    x[:, 0] = np.arange(len(x)) % 251
    raw = x.tobytes()
    cut = {2: (2 * 262144, 3 * 262144 - 100), 3: (3 * 262144 - 100, 4 * 262144)}
    calls = iter(range(10))
    real = shards_module.compress

    def crafted(block):
        b = next(calls)
        if b in cut:
            lo, hi = cut[b]
            return zstandard.ZstdCompressor(level=1).compress(raw[lo:hi]), {"z": "zstd", "raw": hi - lo}
        return real(block)
    monkeypatch.setattr(shards_module, "compress", crafted)
    data = build_shard({"x": list(x)}, {"x": FieldSpec("array", "|u1", (4096,))})
    assert read_header(lambda s, n: data[s:s + n]).fields["x"].flags.all()
    with pytest.raises(IntegrityError, match="block 2 of field 'x' records 262044 raw bytes, not 262144"):
        Shard(data).column("x")
