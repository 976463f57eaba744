"""A delete racing a save that shares a blob never leaves a committed document whose bytes are missing.

Two processes, many rounds: A saves a model whose first leaf is a small array shared with B and whose second
leaf is large and slow to put; while A is still putting it, B saves and deletes a model holding the same small
array. A commits after B's delete. Every committed document must then load completely (invariant 1).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mlwarehouse

ROUNDS = 20

# argv: role, sync folder, rounds. A slow put is a large one that waits (bounded) until B has deleted.
CHILD = r"""
import json, os, sys, time
import numpy as np
import mlwarehouse

role, sync, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
wh = mlwarehouse.connect()
p = wh.project("race")

def shared(r):
    return np.random.default_rng(r).random(2000)

def wait(name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(sync, name)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True

def mark(name):
    open(os.path.join(sync, name), "w").close()

if role == "A":
    inner, state = wh.blobs.put, {}
    def put(data):
        key = inner(data)
        if len(data) > 1_000_000:  # the large leaf: its put lasts until B's delete is over
            mark(f"big-{state['round']}")
            wait(f"deleted-{state['round']}")
        else:
            mark(f"shared-{state['round']}")
        return key
    wh.blobs.put = put
    broken = []
    for r in range(rounds):
        state["round"] = r
        big = np.random.default_rng(10_000 + r).random(400_000)  # 3.2 MB, incompressible
        p.models.save({"a_shared": shared(r), "b_big": big}, name="a", round=r)
        for rec in p.models.find():  # every committed document loads completely
            try:
                rec.load()
            except mlwarehouse.WarehouseError as exc:
                broken.append([rec.doc.get("round"), type(exc).__name__])
        mark(f"checked-{r}")
    print(json.dumps({"broken": broken}))
else:
    for r in range(rounds):
        wait(f"big-{r}")  # A has put the shared array and is putting the large one
        p.models.save({"a_shared": shared(r)}, name="b", round=r)
        p.models.delete("b")
        mark(f"deleted-{r}")
        wait(f"checked-{r}")
    print(json.dumps({"done": rounds}))
"""


@pytest.mark.slow
def test_delete_beside_a_slow_save_sharing_a_blob(tmp_path, subprocess_env):
    home = tmp_path / "wh"
    env = {**subprocess_env, "MLW_HOME": str(home)}
    env.pop("MLW_URI", None)
    env.pop("MLW_BLOBS", None)
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, role, str(sync), str(ROUNDS)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for role in "AB"]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert json.loads(outputs[0][0].strip().splitlines()[-1]) == {"broken": []}
    with mlwarehouse.connect(home=home) as wh:
        records = wh.project("race").models.find()
        assert len(records) == ROUNDS
        for rec in records:
            assert all(wh.blobs.exists(key) for key in rec.doc["_blobs"])
            assert rec.load()["a_shared"].shape == (2000,)
