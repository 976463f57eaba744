"""Checkpoints at disk speed, and still safe: batched puts (background writes, one folder sync per checkpoint),
keys hashed in parallel, loads that read into buffers the tensors then own (verified as read), compression probes
that skip float weights, and a process SIGKILLed mid-checkpoint leaving no partial model."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

import mlwarehouse
from mlwarehouse import schema
from mlwarehouse.blobs.base import blob_key, current_batch, put_batch
from mlwarehouse.blobs.common import fanout
from mlwarehouse.blobs.files import FileBlobStore
from mlwarehouse.codecs import decode_leaf, encode_leaf
from mlwarehouse.codecs.values import pack, unpack
from mlwarehouse.errors import BackendError, CodecError, IntegrityError

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tests.conftest import PYTHON, ROOT, wait_for  # noqa: E402


def _net(layers: int = 4, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


# -- batched puts -----------------------------------------------------------------------------------------------

def test_batched_puts_are_durable_when_the_batch_ends(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    payloads = [os.urandom(2 << 20) for _ in range(6)]
    with put_batch() as batch:
        assert current_batch() is batch
        keys = [store.put(p) for p in payloads]
        store.put(payloads[0])  # the same bytes twice in one batch: written once
    assert current_batch() is None
    assert keys == [hashlib.sha256(p).hexdigest() for p in payloads]
    for key, data in zip(keys, payloads):
        assert store.get(key) == data
    assert not [p for p in (tmp_path / "blobs").rglob(".tmp-*")]  # nothing half-written left behind


def test_a_failed_background_write_is_raised_at_the_end_and_no_model_is_written(wh):
    """A write that fails on the blob pool (here: a fan-out folder that cannot be made, because a file holds its
    name) fails the save; the document is never inserted."""
    p = wh.project("speed")
    net = _net(2, 64)
    first = net[0].weight.detach().contiguous()
    key = hashlib.sha256(memoryview(first.numpy()).cast("B")).hexdigest()
    top = wh.blobs.root / fanout(key).split("/")[0]
    top.parent.mkdir(parents=True, exist_ok=True)
    top.write_bytes(b"in the way")
    with pytest.raises(BackendError):
        p.models.save(net, "blocked", arch="script")
    assert p.models.find("blocked") == []
    top.unlink()
    rec = p.models.save(net, "blocked", arch="script")  # the same save works once the disk lets it
    assert torch.equal(rec.load().state_dict()["0.weight"], net[0].weight)


def test_an_error_inside_the_batch_waits_for_the_writes_and_keeps_its_own_error(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(ZeroDivisionError):
        with put_batch():
            key = store.put(os.urandom(1 << 20))
            1 / 0
    assert store.exists(key)  # the write finished (nothing runs on behind the caller), just unreferenced


def test_keys_hashed_ahead_are_the_sha256_of_the_payloads(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", fsync=False)
    tensors = [torch.randn(1 << 18) for _ in range(5)] + [torch.zeros(1 << 18)]
    tree = pack(tensors, store.put)
    for ref, t in zip(tree, tensors):
        assert ref["_blob"] == blob_key(store.get(ref["_blob"]))
        if "z" not in ref:
            assert ref["_blob"] == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert "z" in tree[-1]  # zeros still compress: probing skips only what cannot pay
    back = unpack(tree, store.get)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))


def test_prehash_memo_never_answers_for_another_object():
    with put_batch() as batch:
        a, b = bytes(2 << 20), bytearray(2 << 20)
        batch.prehash([a, b])
        assert blob_key(a) == hashlib.sha256(a).hexdigest()
        c = bytes(b"x" * (2 << 20))
        assert blob_key(c) == hashlib.sha256(c).hexdigest()
    assert batch.keys == {}


# -- compression probes ------------------------------------------------------------------------------------------

def test_float_weights_are_not_compressed_but_sparse_ones_are():
    random_weights = torch.randn(1 << 20)  # 4 MiB: under the old probe threshold, now probed
    data, meta = encode_leaf(random_weights)
    assert "z" not in meta and len(memoryview(data).cast("B")) == 4 << 20
    sparse = torch.zeros(1 << 20)
    sparse[::1000] = 1.0
    data, meta = encode_leaf(sparse)
    assert meta.get("z") == "zstd" and len(data) < (1 << 20)
    assert torch.equal(decode_leaf(data, meta), sparse)


# -- loading ----------------------------------------------------------------------------------------------------

def test_get_buffer_is_owned_writable_and_verified(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", fsync=False)
    data = os.urandom(3 << 20)
    key = store.put(data)
    buf = store.get_buffer(key, len(data))
    assert not buf.readonly and bytes(buf) == data
    with pytest.raises(IntegrityError, match="reference says"):
        store.get_buffer(key, len(data) + 1)  # refused before anything is allocated
    path = tmp_path / "blobs" / fanout(key)
    damaged = bytearray(data)
    damaged[12345] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match="corrupted"):
        store.get_buffer(key)


def test_loaded_tensors_own_their_buffers_without_a_copy(wh):
    p = wh.project("speed")
    net = _net(3, 256)
    rec = p.models.save(net, "owned", arch="script")
    refs = [ref for _, ref in rec.weights]
    tensors = p.unpack(refs)
    for t in tensors:
        t.zero_()  # writable memory of its own: the stored bytes (and the next load) are untouched
    again = p.unpack(refs)
    assert all(not torch.equal(a, b) for a, b in zip(tensors, again))
    assert all(torch.equal(b, w) for b, w in zip(again, net.state_dict().values()))
    # the decoder takes a writable buffer over as the tensor's memory: same address, no copy
    key = refs[0]["_blob"]
    buf = wh.blobs.get_buffer(key)
    t = decode_leaf(buf, {k: v for k, v in refs[0].items() if k not in ("_blob", "size")})
    assert t.data_ptr() == np.frombuffer(buf, np.uint8).ctypes.data
    # one blob referred to twice: two tensors, not one memory
    key_ref = refs[0]
    twice = p.unpack([key_ref, dict(key_ref)])
    twice[0].zero_()
    assert not torch.equal(twice[0], twice[1])


def test_crafted_tensor_meta_is_refused_before_allocating():
    with pytest.raises(CodecError, match="needs"):
        decode_leaf(b"", {"codec": "tensor", "dtype": "float32", "shape": [10 ** 12]})
    with pytest.raises(CodecError, match="bad shape"):
        decode_leaf(b"\0" * 8, {"codec": "tensor", "dtype": "float32", "shape": [-2, -1]})
    with pytest.raises(CodecError, match="needs"):
        decode_leaf(b"\0" * 8, {"codec": "tensor", "dtype": "float32", "shape": [3]})


def test_a_crafted_size_is_refused_by_the_parallel_reader(wh):
    p = wh.project("speed")
    tree = p.pack([torch.randn(1 << 18), torch.randn(1 << 18)])
    tree[1] = {**tree[1], "size": 10 ** 12}
    with pytest.raises(IntegrityError, match="reference says"):
        p.unpack(tree)


class WithState(nn.Module):
    """Keeps a non-persistent buffer: it cannot come back from the meta device, so it is built on the CPU."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("scale", torch.full((width,), 2.0), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale


class Plain(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x)


def test_class_modules_are_built_on_meta_unless_they_keep_tensors_of_their_own(wh, monkeypatch):
    from mlwarehouse.models import torch_io
    monkeypatch.setattr(torch_io, "META_FROM", 0)  # every module counts as large
    p = wh.project("speed")
    x = torch.randn(3, 8)
    for cls in (Plain, WithState):
        torch.manual_seed(1)
        net = cls()
        p.models.save(net, cls.__name__, arch="class", config={"width": 8})
        back = p.models.load(cls.__name__)
        assert not any(t.is_meta for t in list(back.parameters()) + list(back.buffers()))
        assert torch.allclose(back(x), net.eval()(x))


SAVE_BIG = r"""
import sys, torch, mlwarehouse
torch.manual_seed(0)
net = torch.nn.Linear(4096, 4096, bias=False)  # 64 MiB, an importable class: built on meta when loaded
mlwarehouse.connect(sys.argv[1]).project("rss").models.save(
    net, "big", arch="class", config={"in_features": 4096, "out_features": 4096, "bias": False})
"""

LOAD_BIG = r"""
import json, resource, sys, torch, mlwarehouse
import torch._meta_registrations  # a one-time import, not the load's own memory
wh = mlwarehouse.connect(sys.argv[1])
p = wh.project("rss")
small = torch.nn.Linear(4, 4)
p.models.save(small, "small", arch="class", config={"in_features": 4, "out_features": 4})
p.models.load("small")  # the code a load imports is imported now
statm = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
try:  # the peak of the load alone: reset the kernel's high-water mark (what imports before it peaked at)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_now = high_water
except OSError:
    peak_now = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = statm()
back = p.models.load("big")
peak = peak_now()
print(json.dumps({"before": before, "peak": peak, "bytes": back.weight.nbytes, "after": statm()}))
"""


@pytest.mark.slow
def test_a_load_holds_the_weights_once(tmp_path):
    """Peak resident set of a load (in a fresh process) above what the process held before: the weights once,
    neither a copy of the bytes read nor the module's own initial weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLW_TRUSTED_MODULES": "torch.nn"}
    for script in (SAVE_BIG, LOAD_BIG):
        out = subprocess.run([PYTHON, "-c", script, str(tmp_path / "wh")], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["before"]
    assert r["bytes"] == 64 << 20
    assert grown <= 1.25 * r["bytes"], f"a load of {r['bytes']} bytes grew the process by {grown} ({r})"


# -- SIGKILL mid-checkpoint ----------------------------------------------------------------------------------------

ZYGOTE = r"""
import os, sys, torch, mlwarehouse
from torch import nn
torch.set_num_threads(1)

def checkpoint_forever(seed):
    p = mlwarehouse.connect().project("kill")
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # 16 tensors, 8 MiB: many puts per batch
    epoch = 0
    while True:
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        p.models.checkpoint(net, run=f"R{seed}", epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)}, keep_last=2,
                            arch="script")
        epoch += 1

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            checkpoint_forever(int(line))
        finally:
            os._exit(1)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def _count(home, run: str) -> int:
    with mlwarehouse.connect(home=home) as wh:
        return wh.project("kill").count(schema.MODELS.name, {"run": run})


def _all_load(home) -> int:
    with mlwarehouse.connect(home=home) as wh:
        records = wh.project("kill").models.find(checkpoints=True)
        for rec in records:
            for key in rec.doc.get("_blobs", []):
                assert wh.blobs.exists(key), f"checkpoint {rec.id} refers to the missing blob {key}"
            module = rec.load()  # every blob read and verified
            assert set(module.state_dict()) == {name for name, _ in rec.weights}
        return len(records)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_leaves_no_partial_model(tmp_path, subprocess_env):
    rng = random.Random(18)
    home = tmp_path / "wh"
    zygote = subprocess.Popen([PYTHON, "-c", ZYGOTE], env=subprocess_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = 0
    try:
        for round_ in range(8):
            zygote.stdin.write(f"{round_}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline() or "0")
            assert pid > 0, zygote.stderr.read()
            wait_for(lambda: _count(home, f"R{round_}") > 0, timeout=60)  # it checkpoints: now strike
            time.sleep(rng.uniform(0.0, 0.4))  # inside a checkpoint: puts returned, writes in flight, or the insert
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the saver died on its own"
            kills += 1
            _all_load(home)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert kills == 8 and _all_load(home) > 0
    with mlwarehouse.connect(home=home) as wh:
        assert wh.gc(grace_seconds=0).referenced > 0  # what the kills left is unreferenced blobs only
    _all_load(home)


def test_numpy_arrays_stay_read_only_views_unless_writable(wh):
    p = wh.project("speed")
    arrays = [np.random.default_rng(0).random(1 << 17), np.random.default_rng(1).random(1 << 17)]
    tree = p.pack(arrays)
    back = p.unpack(tree)
    assert all(not a.flags.writeable for a in back)
    back = p.unpack(tree, writable=True)
    assert all(a.flags.writeable for a in back)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))


def test_s3_blobs_are_packed_and_read_ahead_verified(s3_server):
    """The S3 store keeps its synchronous puts and its verified reads (through the protocol's ``get_buffer``),
    now a few at a time."""
    from tests.test_blobs_s3 import corrupt_object, make_store
    store = make_store(s3_server)
    try:
        tensors = [torch.randn(1 << 18) for _ in range(4)]
        tree = pack(tensors, store.put)
        assert all(store.exists(ref["_blob"]) for ref in tree)
        back = unpack(tree, store.get)
        assert all(torch.equal(a, b) for a, b in zip(back, tensors))
        corrupt_object(store, tree[2]["_blob"], b"\0" * (1 << 20))
        with pytest.raises(IntegrityError):
            unpack(tree, store.get)
    finally:
        store.close()
