"""The README's main command: the end-to-end demo, run for real, its output checked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "mlwarehouse.cli", "demo", "--home", str(tmp_path / "demo"),
                           "--epochs", "8"], env=subprocess_env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "saved dataset digits v1" in out
    assert re.search(r"dispatched a sweep of 6 tasks", out)
    assert re.search(r"6 finished, 0 failed", out)
    assert "leaderboard" in out
    match = re.search(r"test accuracy (\d\.\d+) \(stored (\d\.\d+)\)", out)
    assert match, out[-2000:]
    reloaded, stored = map(float, match.groups())
    assert reloaded == pytest.approx(stored, abs=1e-6) and reloaded > 0.85
    assert "mlw models -p digits-demo" in out
