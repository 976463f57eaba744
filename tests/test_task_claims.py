"""Concurrent claims: many processes pulling from one queue take every task exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

CLAIMER = """
import json, sys
from mlwarehouse import connect
p = connect().project("c")
me = sys.argv[1]
claimed = []
while True:
    task = p.tasks.claim("c", me, 30)
    if task is None:
        break
    claimed.append(task.id)
    if not p.tasks.finish(task.id, me, {"by": me}):
        raise SystemExit(f"lost {task.id}")
print(json.dumps(claimed))
"""


@pytest.mark.slow
def test_eight_processes_claim_each_task_exactly_once(wh, subprocess_env):
    p = wh.project("c")
    created = p.tasks.sweep("c", "builtins:dict", configs=[{"i": i} for i in range(400)])
    decoy = p.tasks.create("not-c", "builtins:dict")
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, f"w{k}"], env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(8)]
    claimed: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        claimed += json.loads(out)
    counts = Counter(claimed)
    assert len(counts) == len(created) == 400 and max(counts.values()) == 1
    assert set(counts) == {t.id for t in created}
    done = p.tasks.find(task_name="c")
    assert {t.status for t in done} == {"finished"} and {t.attempts for t in done} == {1}
    assert sum(1 for t in done if t.result["by"] == t.worker) == 400
    assert p.tasks.get(decoy.id).status == "pending"
