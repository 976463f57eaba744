"""Peak memory of saving and loading one large array, against the array's own size.

    python benchmarks/memory.py [--gib 2.0] [--kinds random,compressible]

A float32 array of ``--gib`` GiB, random (uniform in [0, 1): zstd saves about 11%, so it is stored compressed),
compressible (a repeating ramp: stored zstd-compressed) or, asked for by name, noise (random bits: incompressible,
stored as a plain ``.npy``, which saving still copies once), is saved with ``datasets.save`` into an embedded
warehouse, then loaded with ``datasets.load``.
Each measurement runs in a fresh child process, so peaks do not mix: the child notes its resident set before the
array exists, makes (or loads) it, and reports its peak resident set (``ru_maxrss``) less that baseline, divided by
the array's size. Saving holds the array itself, so 1.0x is the floor there; loading starts from nothing.
Targets: save <= 2x, load <= 1.5x (at most one copy beyond the data itself).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

TARGETS = {"save": 2.0, "load": 1.5}
_CHUNK = 1 << 24  # elements filled at a time, so making the array needs no temporary of its size


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make(kind: str, n: int):
    import numpy as np
    arr = np.empty(n, dtype=np.float32)
    rng = np.random.default_rng(0)
    ramp = (np.arange(_CHUNK) % 1024).astype(np.float32)
    for start in range(0, n, _CHUNK):
        part = arr[start:start + _CHUNK]
        if kind == "random":
            rng.random(out=part, dtype=np.float32)
        elif kind == "noise":
            part.view(np.uint32)[...] = rng.integers(0, 1 << 32, len(part), dtype=np.uint32)
        else:
            part[...] = ramp[:len(part)]
    return arr


def child(op: str, kind: str, folder: str, n: int) -> dict:
    """One measurement in this (fresh) process: the peak resident set above the baseline, per array byte."""
    import mlwarehouse
    wh = mlwarehouse.connect(folder)
    base = _rss()
    if op == "save":
        arr = _make(kind, n)
        wh.datasets.save(arr, kind)
    else:
        arr = wh.datasets.load(kind)
        assert arr.shape == (n,)
    peak = _peak()
    wh.close()
    return {"op": op, "kind": kind, "bytes": arr.nbytes, "peak_above_base": peak - base,
            "ratio": (peak - base) / arr.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="array size in GiB (default 2)")
    ap.add_argument("--kinds", default="random,compressible", help="any of random, compressible, noise")
    ap.add_argument("--child", nargs=4, metavar=("OP", "KIND", "FOLDER", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, kind, folder, n = args.child
        print(json.dumps(child(op, kind, folder, int(n))))
        return
    n = int(args.gib * (1 << 30)) // 4
    tmp = Path(tempfile.mkdtemp(prefix="mlw-memory-"))
    print(f"float32 array of {n * 4 / (1 << 30):.2f} GiB; peak RSS above the process's baseline / array size")
    print(f"{'kind':<14}{'op':<6}{'peak MiB':>10}{'ratio':>8}{'target':>8}")
    try:
        for kind in args.kinds.split(","):
            for op in ("save", "load"):
                out = subprocess.run([sys.executable, __file__, "--child", op, kind, str(tmp / "wh"), str(n)],
                                     check=False, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{op} {kind} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                mark = "ok" if r["ratio"] <= TARGETS[op] else "OVER"
                print(f"{kind:<14}{op:<6}{r['peak_above_base'] / (1 << 20):>10.0f}{r['ratio']:>7.2f}x"
                      f"{TARGETS[op]:>7.1f}x {mark}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
