"""The installed ``mlw`` script, as a new user types it: with whatever typer/click a fresh install resolved to,
usage errors are one line and a hint (exit 2), never a traceback, and ``--version`` works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlwarehouse

MLW = Path(sys.executable).parent / "mlw"


def run_mlw(tmp_path, *args):
    assert MLW.exists(), f"the mlw entry point is not installed next to {sys.executable} (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLW_")}
    env["MLW_HOME"] = str(tmp_path / "wh")
    return subprocess.run([str(MLW), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message, hint", [
    (("model",), "No such command 'model'", "Try 'mlw --help' for help."),
    (("show",), "Missing argument 'ID'", "Try 'mlw show --help' for help."),
    (("models", "--limt", "3"), "No such option: --limt", "Try 'mlw models --help' for help."),
])
def test_usage_errors_are_one_line_and_a_hint(tmp_path, args, message, hint):
    proc = run_mlw(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    first, second = proc.stderr.strip().splitlines()
    assert first.startswith("error: ") and message in first
    assert second == hint


def test_version(tmp_path):
    proc = run_mlw(tmp_path, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"mlw {mlwarehouse.__version__}\n" and "Traceback" not in proc.stderr


def test_every_dependency_is_bounded_and_the_installed_releases_are_inside():
    """What ``pip install`` may resolve to is what the suite ran with: a lower and an upper bound (or a pin) on
    every requirement, runtime and extras; and no deprecated license table (pip printed its warning thrice)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # an SPDX expression, not {text = ...}
    assert "setuptools>=77" in project["build-system"]["requires"][0]
    extras = project["project"]["optional-dependencies"]
    for text in project["project"]["dependencies"] + [r for group in extras.values() for r in group]:
        req = Requirement(text)
        ops = {spec.operator for spec in req.specifier}
        assert ops == {"=="} or ({">=", "<"} <= ops), f"{text}: needs a lower and an upper bound"
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            continue  # an extra not installed here
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {text}"
