"""``mlw ui`` through the installed entry point: a server process of its own serves the runs page of the warehouse
it was pointed at (templates compiled as it starts, start-up objects frozen) and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import mlwarehouse
from mlwarehouse.testing.processes import HOST, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_mlw_ui_serves_the_warehouse_and_stops_on_sigint(tmp_path):
    script = Path(sys.executable).parent / "mlw"
    if not script.exists():
        pytest.skip("the mlw entry point is not installed beside this interpreter")
    home = tmp_path / "wh"
    with mlwarehouse.connect(home=home) as wh:
        with wh.project("lab").runs.start("mlp", hyper_parameters={"lr": 0.25}) as run:
            run.log("valid", step=0, acc=0.75)
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k not in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT")}
    env = {**environ, "PYTHONPATH": str(ROOT) + os.pathsep + environ.get("PYTHONPATH", ""), "MLW_HOME": str(home)}
    server = subprocess.Popen([str(script), "ui", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 60, None
        while page is None:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/p/lab/runs", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                assert server.poll() is None, server.communicate()
                assert time.monotonic() < deadline, "mlw ui did not answer within 60 s"
                time.sleep(0.1)
        assert f"data-id=\"{run.id}\"" in page and '<td class="num">0.25</td>' in page
        assert '<td class="num" title="min 0.75 (step 0), max 0.75 (step 0), 1 points">0.75</td>' in page
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert out.startswith(f"mlwarehouse UI on http://{HOST}:{port}/ (read-only)"), out
