"""The README's examples run as written, and its two commands exist."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_quick_start_and_compat_examples_run(tmp_path, subprocess_env):
    blocks = _python_blocks(_section("Quick start"))[:1] + _python_blocks(_section("Coming from TensorHub or MLDB"))
    assert len(blocks) == 4
    script = "\n".join(blocks)
    env = {k: v for k, v in subprocess_env.items() if k != "MLW_HOME"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    best_id, accuracy, shape = lines[0].split(" ", 2)
    assert len(best_id) == 26 and 0.5 < float(accuracy) <= 1.0 and shape == "(8,)"
    assert lines[1] == "logreg"
    assert "'metric': 'loss'" in lines[2] and "'points': 200" in lines[2]
    assert (tmp_path / ".mlwarehouse" / "index.sqlite").exists()


def test_readme_commands_exist():
    table = _section("The two commands")
    for command in ("./scripts/demo", "./scripts/test"):
        assert f"`{command}`" in table
        assert (ROOT / command).exists()
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
