"""Checkpoints at disk speed: saving and loading a model's weights against torch.save + fsync / torch.load.

    python benchmarks/checkpoints.py [--size 1024] [--tensors 16] [--rounds 3]

A module of ``--tensors`` float32 parameters, ``--size`` MiB in all (default 16 x 64 MiB), is saved with
``models.checkpoint`` into an embedded warehouse (SQLite + local blob files, fsync on), and loaded back with
``models.load``; the baseline writes the same state dict with ``torch.save`` to a file and fsyncs it, and reads it
back with ``torch.load(weights_only=True)``. Every measurement runs in a fresh child process (so resident-set peaks
do not mix), which first does the same operation on a tiny model (one-time imports are not timed; the warehouse's
load also imports torch's meta kernels, reported apart), then reports its wall time and its peak resident set
above its baseline (``ru_maxrss`` less the resident set before the operation; for a save, what it needs beyond the
model it holds already). Each round saves a fresh warehouse (a first save: every blob is new) and a fresh file,
then loads both while their bytes are in the page cache, as a checkpoint resumed at once would. Targets (ratio to
the baseline of the same round): save <= 1.0x the time, load <= 1.2x the time, peak RSS of a load <= 1.1x. On a
shared virtual disk fsync times vary from round to round; the median of the rounds is printed. On a virtual machine
the first write into memory the guest never touched costs the hypervisor's fault as well, which lands on whichever
contender grows the page cache first; so, before the rounds, ``--prefault-gib`` GiB (default 8) are touched once and
freed, for the page cache to reuse (:func:`benchmarks.machine.prefault`). Even so, the second 1 GiB written in a
round often costs 5-7x the CPU of the first (the page cache grows past what the last round freed), so the two saves
take turns going first, and each save is compared with the other contender's saves at the same turn (first or
second in a round): the ratio of their medians. Loading checks every byte, against the xxh3 checksum each tensor's
reference records (the local folder is trusted; with ``MLW_TRUST_LOCAL_BLOBS=0``, against its sha256, on
``min(8, CPUs)`` threads: CPU-bound on a machine with few free cores, where ``torch.load`` is not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from benchmarks.machine import prefault  # noqa: E402

TARGETS = {"save time": 1.0, "load time": 1.2, "load peak RSS": 1.1}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_MODULE = "mlw_checkpoint_bench"


def _blocks_class():
    """``Blocks`` from this file loaded as the module ``mlw_checkpoint_bench`` (the ``class`` format stores an
    importable name; the folder itself stays off ``sys.path``, where its files would shadow standard modules)."""
    import importlib.util  # noqa: PLC0415
    if _MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE, __file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[_MODULE].Blocks


try:
    import torch
    from torch import nn

    class Blocks(nn.Module):
        """``tensors`` parameters of ``numel`` random float32 each (incompressible, like trained weights)."""

        def __init__(self, tensors: int = 1, numel: int = 1):
            super().__init__()
            self.weights = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(tensors))
except ImportError:  # torch is needed by the children only
    pass


def _model(tensors: int, numel: int):
    import torch  # noqa: PLC0415
    torch.manual_seed(0)
    return _blocks_class()(tensors=tensors, numel=numel)


def child(op: str, folder: str, tensors: int, numel: int) -> dict:
    """One measurement in this fresh process."""
    import torch  # noqa: PLC0415

    import mlwarehouse  # noqa: PLC0415
    from mlwarehouse.models.torch_io import trust_modules  # noqa: PLC0415
    trust_modules(_MODULE)
    _blocks_class()
    path = Path(folder) / "state.pt"
    model = _model(tensors, numel) if op.endswith("save") else None
    wh = mlwarehouse.connect(str(Path(folder) / "wh")) if op.startswith("mlw") else None
    warm = _warm_up(op, Path(folder))
    base = _rss()
    start, cpu = time.perf_counter(), time.process_time()
    if op == "torch-save":
        with open(path, "wb") as f:
            torch.save(model.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
    elif op == "torch-load":
        state = torch.load(path, weights_only=True)
        assert len(state) == tensors
    elif op == "mlw-save":
        wh.models.checkpoint(model, epoch=1, config={"tensors": tensors, "numel": numel}, arch="class")
    elif op == "mlw-load":
        loaded = wh.models.load("checkpoint", checkpoints=True)
        assert len(loaded.state_dict()) == tensors
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak() - base
    if wh is not None:
        wh.close()
    return {"op": op, "seconds": seconds, "cpu": cpu, "peak": peak, "warm_up": warm}


def _warm_up(op: str, folder: Path) -> float:
    """The same operation on a tiny model first, so one-time imports are not timed; a warehouse load also imports
    torch's meta kernels, which the first model of 64 MiB or more that a process loads pays for (reported apart)."""
    import io  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import mlwarehouse  # noqa: PLC0415
    start = time.perf_counter()
    tiny = _model(2, 4)
    if op.startswith("torch"):
        buf = io.BytesIO()
        torch.save(tiny.state_dict(), buf)
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    else:
        with mlwarehouse.connect(str(folder / f"warm-{op}")) as wh:
            wh.models.save(tiny, "warm", config={"tensors": 2, "numel": 4}, arch="class")
            wh.models.load("warm")
        shutil.rmtree(folder / f"warm-{op}", ignore_errors=True)
        if op == "mlw-load":
            import torch._meta_registrations  # noqa: F401, PLC0415
    return time.perf_counter() - start


def _run(op: str, folder: Path, tensors: int, numel: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", op, str(folder), str(tensors), str(numel)],
                         check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{op} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=1024, help="MiB of weights in all (default 1024)")
    ap.add_argument("--tensors", type=int, default=16, help="parameters the weights are split into (default 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    ap.add_argument("--prefault-gib", type=int, default=8, help="GiB of memory touched once before the rounds")
    ap.add_argument("--child", nargs=4, metavar=("OP", "FOLDER", "TENSORS", "NUMEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, folder, tensors, numel = args.child
        print(json.dumps(child(op, folder, int(tensors), int(numel))))
        return
    prefault_s = prefault(args.prefault_gib)
    numel = int(args.size * (1 << 20)) // 4 // args.tensors
    total = numel * 4 * args.tensors
    tmp = Path(tempfile.mkdtemp(prefix="mlw-checkpoints-", dir=args.dir))
    print(f"{args.tensors} float32 tensors, {total / (1 << 20):.0f} MiB in all; {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds, each against its own baseline; {args.prefault_gib} GiB touched first in "
          f"{prefault_s:.1f} s")
    print(f"{'round':<7}{'op':<10}{'torch s':>9}{'mlw s':>8}{'ratio':>8}   {'torch MiB':>10}{'mlw MiB':>9}{'ratio':>8}"
          f"   {'CPU s (all threads): torch':>27}{'mlw':>7}")
    ratios: dict[str, list[float]] = {name: [] for name in TARGETS}
    by_turn: dict[tuple[str, int], list[float]] = {}  # (contender, 0 if its save went first else 1) -> seconds
    try:
        for r in range(1, args.rounds + 1):
            folder = tmp / f"round{r}"
            folder.mkdir()
            saves = ("torch-save", "mlw-save") if r % 2 else ("mlw-save", "torch-save")  # see the docstring
            got = {op: _run(op, folder, args.tensors, numel) for op in (*saves, "torch-load", "mlw-load")}
            warm = {op: got[op]["warm_up"] for op in got}
            for turn, op in enumerate(saves):
                by_turn.setdefault((op.split("-")[0], turn), []).append(got[op]["seconds"])
            for what in ("save", "load"):
                t, m = got[f"torch-{what}"], got[f"mlw-{what}"]
                time_ratio, rss_ratio = m["seconds"] / t["seconds"], m["peak"] / max(t["peak"], 1)
                ratios[f"{what} time"].append(time_ratio)
                if what == "load":
                    ratios["load peak RSS"].append(rss_ratio)
                rss = f"{rss_ratio:>7.2f}x" if what == "load" else f"{'-':>8}"  # a save holds the model already
                print(f"{r:<7}{what:<10}{t['seconds']:>9.3f}{m['seconds']:>8.3f}{time_ratio:>7.2f}x   "
                      f"{max(t['peak'], 0) / (1 << 20):>10.0f}{max(m['peak'], 0) / (1 << 20):>9.0f}{rss}"
                      f"   {t['cpu']:>27.2f}{m['cpu']:>7.2f}")
            shutil.rmtree(folder, ignore_errors=True)
        print()
        print(f"one-time imports before timing (a fresh process pays them once): torch {warm['torch-load']:.2f} s, "
              f"warehouse load {warm['mlw-load']:.2f} s (torch's meta kernels included)")
        for name, target in TARGETS.items():
            median = statistics.median(ratios[name])
            mark = "ok" if median <= target else "OVER"
            if name == "save time" and all(by_turn.get((who, turn)) for who in ("torch", "mlw") for turn in (0, 1)):
                # the round's ratio mostly says who saved first: compare saves that went at the same turn
                turns = [statistics.median(by_turn["mlw", turn]) / statistics.median(by_turn["torch", turn])
                         for turn in (0, 1)]
                mark = "ok" if max(turns) <= target else "OVER"
                print(f"{name:<15} {turns[0]:.2f}x of torch when each saves first in its round, {turns[1]:.2f}x "
                      f"when each saves second (medians of the saves at that turn; per-round ratios: "
                      f"{', '.join(f'{x:.2f}' for x in ratios[name])}), target <= {target:.1f}x {mark}")
                continue
            print(f"{name:<15} median {median:.2f}x of torch (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratios[name])}), target <= {target:.1f}x {mark}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
