"""Continuous-loop latency: a model saved -> its event seen -> evaluated -> promoted -> served, across processes.

    python benchmarks/continuous.py [--models 20] [--interval 1.0] [--poll 0.05] [--poll 0]   # 0: the defaults
    python benchmarks/continuous.py --http      # also through `mlw serve` (GET /version), where it is installed

Per poll row, on a fresh embedded warehouse (SQLite index + blob folder) in a temporary folder, four processes
(six with --http):
this one saves ``--models`` linear models ``--interval`` seconds apart (jittered, so saves do not lock step with
the polls), each strictly better on the test set than the last (so each is promoted), stamping ``time.time()``
just before its ``models.save``; the evaluator (``mlw evaluate --metric mse --alias champion --poll P``) records
each model's evaluation and promotes it through the gate; a deployer follows ``mlp@champion``
(``wh.models.follow(poll=P)``) and prints the time each new holder starts serving (its ``on_swap``); a watch
consumer (``wh.watch("models", poll=P)``) prints the time each model's event reaches it (the event latency alone).
One machine, one clock. Measured per model, from the stamp before its save: ``event`` (the watch consumer got
it), ``evaluated`` (the evaluation document's ``time``), ``promoted`` (the alias change's ``changed``), ``served``
(the deployer's swap), and with ``--http`` ``http`` (a client polling GET /version of ``mlw serve mlp@champion
--poll P`` every 5 ms saw the new id). A follower that reads the alias after two promotions loads only the newer
model, by design: the older one counts as served when the newer one is (the ``superseded`` column counts them).

Printed per row: the poll intervals (evaluator's watch / deployer's follow; ``--poll 0`` runs each with its own
default), p50 / p95 / max per stage in ms, the floor (the baseline, measured in-process in this run on a warehouse
of its own: one ``models.save``, then one evaluation as the evaluator computes and records it, one promotion, one
load of the new holder; each stage's floor adds the steps before it) and p95 / floor, and whether the targets are
met: saved -> served p95 <= 2 s, saved -> event p95 <= 0.5 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this file's folder comes first on sys.path and benchmarks/logging.py would shadow the standard library's: drop it
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mlwarehouse  # noqa: E402
from mlwarehouse.collections import watch as watching  # noqa: E402
from mlwarehouse.ids import parse_time  # noqa: E402
from mlwarehouse.loops import follow as following  # noqa: E402
from mlwarehouse.training.objectives import metric_of  # noqa: E402

SERVED_TARGET = 2.0
EVENT_TARGET = 0.5
ROWS = 2000
TRUE_W = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)
DIRECTION = np.random.default_rng(7).normal(size=TRUE_W.shape).astype(np.float32)
FOLLOW_POLL = inspect.signature(following.follow).parameters["poll"].default
STAGES = ("event", "evaluated", "promoted", "served", "http")
SERVING = ("served", "http")

DEPLOYER = """
import json, sys, time
import mlwarehouse
poll = float(sys.argv[1]) or None
wh = mlwarehouse.connect()
while wh.models.aliases.head("mlp@champion") is None:  # the warm-up model is not promoted yet
    time.sleep(0.02)
swapped = lambda old, new: print(json.dumps({"model": new, "at": time.time()}), flush=True)
served = wh.models.follow("mlp@champion", on_swap=swapped, **({} if poll is None else {"poll": poll}))
print(json.dumps({"ready": served.model_id, "poll": served.poll}), flush=True)
sys.stdin.read()  # until the benchmark closes it
served.close()
"""

WATCHER = """
import json, sys, time
import mlwarehouse
poll = float(sys.argv[1]) or None
wh = mlwarehouse.connect()
watch = wh.watch("models", where={"name": "mlp"}, start="now", poll=poll)
print(json.dumps({"ready": True, "poll": watch.poll}), flush=True)
for event in watch:
    print(json.dumps({"model": event.id, "at": time.time()}), flush=True)
"""

HTTP_CLIENT = """
import json, sys, time, urllib.request
url, last = sys.argv[1], None
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            body = reply.read().decode()
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
        continue
    now = time.time()
    try:
        value = json.loads(body)
    except ValueError:
        value = body.strip()
    if isinstance(value, dict):
        value = next((value[k] for k in ("model", "model_id", "id") if k in value), None)
    if last is None:
        print(json.dumps({"ready": value}), flush=True)
    elif value != last:
        print(json.dumps({"model": value, "at": now}), flush=True)
    last = value
    time.sleep(0.005)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def linear(scale: float) -> torch.nn.Linear:
    """The true weights plus ``scale`` times a fixed direction: its mse on any test set grows with ``scale``²."""
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy((TRUE_W + scale * DIRECTION).T.copy()))
    return layer


def test_set(wh):
    x = np.random.default_rng(0).normal(size=(ROWS, 4)).astype(np.float32)
    return wh.datasets.save((x, x @ TRUE_W), "test-set")


def stamp(value: str) -> float:
    return parse_time(value).timestamp()


class Child:
    """A child process whose stdout JSON lines are collected by a thread (``ready`` first, then events)."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, stdin: bool = False):
        self.name, self.log = name, log
        self.lines: list[dict] = []
        self._err = open(log, "w")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def ready(self, timeout: float, needs: "Child | None" = None) -> dict:
        """Its first line; RuntimeError if it (or ``needs``, the process it talks to) exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not self.lines:
            for child in (self, needs):
                if child is not None and child.proc.poll() is not None:
                    raise RuntimeError(f"the {child.name} exited:\n{child.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        return self.lines[0]

    def seen(self) -> dict[str, float]:
        """The first time each model id was reported."""
        out: dict[str, float] = {}
        for line in self.lines[1:]:
            out.setdefault(line["model"], line["at"])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluator_argv(poll: float) -> list[str]:
    mlw = shutil.which("mlw", path=str(Path(sys.executable).parent))
    head = [mlw, "evaluate"] if mlw else [sys.executable, "-m", "mlwarehouse.loops.evaluator"]
    return head + ["--models", '{"name": "mlp"}', "--dataset", "test-set", "--metric", "mse", "--alias",
                   "champion", "--mode", "min"] + (["--poll", str(poll)] if poll else [])


def baseline(home: Path, reps: int = 5) -> dict[str, float]:
    """Medians in seconds of one save, one evaluation (find, load, compute, record in a run), one promotion and
    one load of the new holder, in this process: what the loop adds its waits to."""
    wh = mlwarehouse.connect(home=home)
    try:
        data = test_set(wh)
        x, y = (torch.tensor(a) for a in data.load())
        mse = metric_of("mse")
        times: dict[str, list[float]] = {"save": [], "evaluate": [], "promote": [], "load": []}
        for k in range(reps + 1):
            layer = linear(3.0 - 0.1 * k)
            t0 = time.perf_counter()
            record = wh.models.save(layer, "mlp")
            t1 = time.perf_counter()
            wh.models.evaluations.find(record, data, "mse", limit=1)
            model = wh.models.get(record.id).load().eval()
            with torch.no_grad():
                total = sum(mse(model(x[i:i + 1024]), y[i:i + 1024], len(y[i:i + 1024])) for i in range(0, ROWS, 1024))
            with wh.runs.start("evaluate mlp", evaluated=record.id, by="baseline") as run:
                wh.models.evaluations.record(record, data, "mse", total / ROWS, run=run)
            t2 = time.perf_counter()
            wh.models.aliases.promote("mlp", "champion", record, evaluation=(data, "mse"), mode="min", by="baseline")
            t3 = time.perf_counter()
            wh.models.get(record.id).load()
            t4 = time.perf_counter()
            if k:  # the first is a warm-up
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[key].append(value)
        return {key: statistics.median(values) for key, values in times.items()}
    finally:
        wh.close()


def measure(home: Path, poll: float, args, http: bool) -> dict:
    env = {**os.environ, "MLW_HOME": str(home), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("MLW_URI", "MLW_BLOBS", "MLW_PROJECT"):
        env.pop(name, None)
    wh = mlwarehouse.connect(home=home)
    children: list[Child] = []
    try:
        data = test_set(wh)
        wh.models.save(linear(4.0), "mlp", seq=-1)  # the warm-up: the deployer follows once it is champion
        children.append(Child("evaluator", evaluator_argv(poll), env, home.parent / f"{home.name}-evaluator.log"))
        deployer = Child("deployer", [sys.executable, "-c", DEPLOYER, str(poll)], env,
                         home.parent / f"{home.name}-deployer.log", stdin=True)
        watcher = Child("watcher", [sys.executable, "-c", WATCHER, str(poll)], env,
                        home.parent / f"{home.name}-watcher.log")
        children += [deployer, watcher]
        follow_poll = deployer.ready(60)["poll"]  # the warm-up model is champion: a server can start now
        watch_poll = watcher.ready(60)["poll"]
        client = None
        if http:
            port = free_port()
            mlw = shutil.which("mlw", path=str(Path(sys.executable).parent))
            serve = [mlw, "serve"] if mlw else [sys.executable, "-m", "mlwarehouse.loops.server"]
            serve += ["mlp@champion", "--port", str(port)] + (["--poll", str(poll)] if poll else [])
            server = Child("server", serve, env, home.parent / f"{home.name}-server.log")
            client = Child("http client", [sys.executable, "-c", HTTP_CLIENT, f"http://127.0.0.1:{port}/version"],
                           env, home.parent / f"{home.name}-client.log")
            try:
                client.ready(60, needs=server)
                children += [server, client]
            except RuntimeError as exc:  # the server is another piece: its failure leaves the rest measured
                print(f"--http: no server to time ({exc}); measuring without it", file=sys.stderr)
                client.stop()
                server.stop()
                client = None
        time.sleep(1.0)  # every reader has done its first read
        rng = random.Random(0)
        sent: dict[str, float] = {}
        saves: list[float] = []
        for i in range(args.models):
            time.sleep(args.interval * rng.uniform(0.5, 1.5))
            layer = linear(3.0 * (1 - (i + 1) / (args.models + 1)))  # strictly better than the one before
            started = time.time()
            record = wh.models.save(layer, "mlp", seq=i)
            saves.append(time.time() - started)
            sent[record.id] = started
        last = record.id
        deadline = time.monotonic() + 30
        while last not in deployer.seen() or (client is not None and last not in client.seen()):
            if time.monotonic() > deadline or any(c.proc.poll() is not None for c in children):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        for child in children:
            if child.proc.poll() is not None:
                print(f"the {child.name} exited ({child.proc.returncode}) during the run:\n"
                      f"{child.log.read_text()[-2000:]}", file=sys.stderr)
        reached: dict[str, dict[str, float]] = {s: {} for s in STAGES}
        reached["event"] = watcher.seen()
        reached["served"] = deployer.seen()
        if client is not None:
            reached["http"] = client.seen()
        for model in sent:
            found = wh.models.evaluations.find(model, data, "mse", limit=1)
            if found:
                reached["evaluated"][model] = stamp(found[0].doc["time"])
        for change in wh.models.aliases.history("mlp", "champion"):
            if change.doc.get("model") in sent:
                reached["promoted"].setdefault(change.doc["model"], stamp(change.doc["changed"]))
    finally:
        for child in reversed(children):
            child.stop()
        wh.close()
    row: dict = {"watch_poll_s": watch_poll, "follow_poll_s": follow_poll, "models": len(sent),
                 "save_p50_ms": round(statistics.median(saves) * 1000, 1)}
    for stage in STAGES:
        if stage == "http" and client is None:
            continue
        when, skipped = reached[stage], 0
        if stage in SERVING:  # a holder replaced before a follower read the alias is never loaded, by design:
            when, newest = {}, None  # it counts as served once it or a later (better) model serves
            for model in reversed(list(sent)):
                mine = reached[stage].get(model)
                newest = mine if newest is None or (mine is not None and mine < newest) else newest
                if newest is not None:
                    when[model] = newest
                    skipped += mine is None
        ms = [(when[m] - t) * 1000 for m, t in sent.items() if m in when]
        row[stage] = {"n": len(ms), "superseded": skipped} if not ms else {
            "n": len(ms), "superseded": skipped, "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(percentile(ms, 0.95), 1), "max_ms": round(max(ms), 1)}
    return row


def verdict(row: dict, stage: str, target: float) -> str:
    figures = row[stage]
    if figures["n"] < row["models"]:
        return f"target missed ({row['models'] - figures['n']} of {row['models']} models never reached it)"
    p95 = figures["p95_ms"] / 1000
    return f"p95 {p95:.3f} s {'<=' if p95 <= target else '>'} {target} s: target {'met' if p95 <= target else 'missed'}"


def report(rows: list[dict], floor: dict[str, float], args) -> None:
    floors = {"event": floor["save"]}
    floors["evaluated"] = floors["event"] + floor["evaluate"]
    floors["promoted"] = floors["evaluated"] + floor["promote"]
    floors["served"] = floors["http"] = floors["promoted"] + floor["load"]
    print(f"baseline (in-process medians): save {floor['save'] * 1000:.1f} ms, evaluate {floor['evaluate'] * 1000:.1f}"
          f" ms, promote {floor['promote'] * 1000:.1f} ms, load {floor['load'] * 1000:.1f} ms")
    for row in rows:
        print(f"\npoll: evaluator watch {row['watch_poll_s']} s, deployer follow {row['follow_poll_s']} s  "
              f"({row['models']} models ~{args.interval} s apart; save p50 here {row['save_p50_ms']} ms)")
        print(f"{'saved ->':12}{'n':>5}{'p50_ms':>10}{'p95_ms':>10}{'max_ms':>10}{'floor_ms':>10}{'p95/floor':>11}"
              f"{'superseded':>12}")
        for stage in STAGES:
            if stage not in row:
                continue
            f = row[stage]
            if "p95_ms" not in f:
                print(f"{stage:12}{f['n']:>5}  (no model reached this stage)")
                continue
            ratio = f["p95_ms"] / (floors[stage] * 1000)
            print(f"{stage:12}{f['n']:>5}{f['p50_ms']:>10}{f['p95_ms']:>10}{f['max_ms']:>10}"
                  f"{floors[stage] * 1000:>10.1f}{ratio:>11.1f}{f['superseded'] if stage in SERVING else '':>12}")
        print(f"saved -> served: {verdict(row, 'served', SERVED_TARGET)}")
        print(f"saved -> event:  {verdict(row, 'event', EVENT_TARGET)}")
    print(json.dumps({"models": args.models, "interval": args.interval,
                      "baseline_ms": {k: round(v * 1000, 2) for k, v in floor.items()}, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=20, help="models saved per poll row")
    parser.add_argument("--interval", type=float, default=1.0, help="mean seconds between saves")
    parser.add_argument("--poll", type=float, action="append",
                        help=f"poll intervals to measure, for the evaluator and the deployer alike; 0: each its "
                             f"default (watch {watching.POLL_SECONDS} s, follow {FOLLOW_POLL} s). Default: 0.05 and 0")
    parser.add_argument("--http", action="store_true", help="also time GET /version of `mlw serve` (if installed)")
    args = parser.parse_args()
    if args.models < 1 or args.interval < 0:
        parser.error("--models needs at least 1 and --interval a number >= 0")
    http = args.http and importlib.util.find_spec("mlwarehouse.loops.server") is not None
    if args.http and not http:
        print("--http: mlwarehouse.loops.server is not installed here; measuring without it", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        floor = baseline(Path(tmp) / "baseline")
        rows = [measure(Path(tmp) / f"wh-{i}", poll, args, http) for i, poll in enumerate(args.poll or [0.05, 0.0])]
    report(rows, floor, args)


if __name__ == "__main__":
    main()
