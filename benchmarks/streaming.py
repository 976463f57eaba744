"""Streaming throughput: item datasets against a raw memmap gather and against one blob read per item.

    python benchmarks/streaming.py [--scale 1.0] [--epochs 3] [--rounds 3] [--no-s3]

Workloads: (a) 60,000 items of 784 bytes + a label (MNIST-like), (b) 5,000 items of 150 KB (224x224x3 uint8),
read shuffled in batches of 256 (a) or 32 (b). Baselines, measured in the same run on the same bytes in the same
shuffled order (each epoch's own order): (1) ``raw``: a numpy memmap of all items gathered batch by batch (the limit
of any reader); (2) ``per-item``: one verified blob read per item, as stores with a document per sample load.
The stream is measured cold (memory cache emptied: every shard fetched, checked and decoded, one epoch; the
process's prefetch threads, started once, and the decode buffers that the evicted shards gave back are not: the
case of every epoch over a dataset larger than the memory cache) and warm (``--epochs`` epochs after a warm-up
epoch, shards served from the process's bounded memory cache). A local folder is trusted, so a cold read checks
each shard against the xxh3 checksum its document records; the same cold epoch is also measured with the folder
untrusted (sha256 of every shard), and once, before the rounds, as the process's first epoch (fresh buffers: every
page faulted in). A local folder's default (``compression="auto"``) stores shard blocks as they are, so a cold
read maps each shard and its columns are views of the page cache; the same cold epoch is measured on a copy of
the dataset written with ``compression="zstd"`` (the stored sizes are printed). ``--prefault-gib`` GiB are
touched first (:func:`benchmarks.machine.prefault`: on a virtual machine, memory the guest never touched costs the
hypervisor's fault on first write). Its time includes planning
(the index query and the shuffle).
Every file is in the OS page cache for every contender. The contenders run in ``--rounds`` rounds, each in a rotated
order, and each reports its median round, in wall-clock time and in CPU time (of every thread of the process: on a
machine shared with other work, the CPU ratio says how much work a reader does, the wall ratio how much it
overlaps). Each stream run is paired with a raw gather run just before it, and its ratios to raw are the medians of
its ratios to its pairs: on a shared machine the load drifts between rounds (the raw gather's own rounds varied 2x),
so a ratio of two medians taken apart compared different loads. Then the same through S3 (a local SeaweedFS), with
the disk shard cache cold and warm and the memory cache off (per-item S3 reads measured on a sample).
Targets (workload a): warm >= 0.6x raw, cold >= 0.4x raw; >= 20x per-item.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import mlwarehouse  # noqa: E402
from benchmarks.machine import prefault  # noqa: E402
from mlwarehouse.blobs.files import FileBlobStore  # noqa: E402
from mlwarehouse.datasets.items import ItemDatasets  # noqa: E402
from mlwarehouse.datasets.shardcache import ShardCache  # noqa: E402
from mlwarehouse.datasets.shardmemory import MEMORY, MEMORY_BYTES  # noqa: E402
from mlwarehouse.datasets.stream import batch_order  # noqa: E402


def workload(kind: str, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(0)
    if kind == "a":
        n = int(60_000 * scale)
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 6:22, 6:22] = rng.integers(0, 256, (n, 16, 16), np.uint8)  # digits: a noisy middle, blank borders
        return x, rng.integers(0, 10, n), 256
    n = int(5_000 * scale)
    return rng.integers(0, 256, (n, 224, 224, 3), np.uint8), rng.integers(0, 1000, n), 32


#: the targets of workload a: (reader, least multiple of the raw gather's items/s)
TARGETS = (("stream, warm (memory cache)", 0.6), ("stream, cold (fetch+xxh3)", 0.4))


def timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds (every thread of this process) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def run_stream(ds, batch: int, **options) -> tuple[tuple[float, float], np.ndarray]:
    order = []

    def go():
        for b in ds.stream(batch_size=batch, seed=1, **options):
            order.append(b["label"])
    return timed(go), np.concatenate(order)


def plan_rows(ds, batch, epoch: int) -> np.ndarray:
    """Global item numbers (insertion order) in the order the stream hands them out in ``epoch``, for the
    baselines: the plan's order, grouped by shard inside each batch as the stream does."""
    plan = ds.stream(batch_size=batch, seed=1).plan(epoch)
    counts = [d["count"] for d in ds.project.find("item_shards", ds._scope(), sort=[("_id", 1)])]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts[plan.shard] + plan.row)[batch_order(plan.shard, batch)]


def rounds(contenders: dict, count: int) -> dict[str, tuple[float, float]]:
    """Median wall-clock and CPU seconds of each contender over ``count`` rounds, each round in a rotated order."""
    names = list(contenders)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(count):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(contenders[name]())
    return {name: (float(np.median([w for w, _ in t])), float(np.median([c for _, c in t])))
            for name, t in times.items()}


def bench(kind: str, scale: float, tmp: Path, s3: dict | None, epochs: int, count: int) -> list[dict]:
    x, y, batch = workload(kind, scale)
    n, item_bytes = len(x), x[0].nbytes
    mb = n * item_bytes / 1e6
    wh = mlwarehouse.connect(home=tmp / f"wh-{kind}")
    items = ItemDatasets(wh.project("bench"))
    t_write = timed(lambda: items.from_arrays(kind, {"x": x, "label": y}))[0]
    ds = items.get(kind)
    zstd = items.from_arrays(f"{kind}-zstd", {"x": x, "label": y}, compression="zstd")
    stored = {name: sum(d["blob"]["size"] for d in d_.project.find("item_shards", d_._scope())) / 1e6
              for name, d_ in (("auto", ds), ("zstd", zstd))}
    orders = [plan_rows(ds, batch, e) for e in range(epochs)]
    mm_path = tmp / f"{kind}.npy"
    np.save(mm_path, x)
    mm = np.load(mm_path, mmap_mode="r")
    per_item = FileBlobStore(tmp / f"per-item-{kind}", fsync=False)
    keys = [per_item.put(memoryview(x[i]).cast("B")) for i in range(n)]

    def gather():
        for order in orders:
            for a in range(0, n, batch):
                idx = order[a:a + batch]
                mm[idx], y[idx]

    def one_by_one():
        order = orders[0]
        for a in range(0, n, batch):
            np.stack([np.frombuffer(per_item.get(keys[i]), np.uint8) for i in order[a:a + batch]])

    def cold(dataset=ds):
        MEMORY.resize(0)  # empties the memory cache: every shard is fetched, verified and decoded again
        MEMORY.resize(MEMORY_BYTES)
        return run_stream(dataset, batch)[0]

    def cold_sha256():
        wh.blobs.trusted = False  # every shard checked against its sha256
        try:
            return cold()
        finally:
            wh.blobs.trusted = True

    def warm():
        run_stream(ds, batch)  # warm-up epoch
        t, got = run_stream(ds, batch, epochs=epochs)
        assert np.array_equal(got, y[np.concatenate(orders)]), "the stream's order is not the planned one"
        return t

    pairs: dict[str, list[tuple]] = {"cold": [], "sha256": [], "warm": [], "first": [], "zstd": []}

    def paired(name: str, fn):
        """``fn`` timed right after a raw gather, which is kept as its pair: ratios of the two see the same load."""
        def go():
            base = timed(gather)
            t = fn()
            pairs[name].append((base, t))
            return t
        return go

    gather(), one_by_one()  # page cache warm for every contender
    t = {"first": paired("first", cold)()}  # this process's first epoch: no decode buffer to reuse yet
    t.update(rounds({"raw": lambda: timed(gather), "cold": paired("cold", cold),
                     "sha256": paired("sha256", cold_sha256), "warm": paired("warm", warm),
                     "zstd": paired("zstd", lambda: cold(zstd)),
                     "per-item": lambda: timed(one_by_one)}, count))
    held = MEMORY.used_bytes / 1e6
    rows = [{"workload": kind, "store": "local", "reader": name, "epochs": e, "items": n * e, "s": t[key][0],
             "cpu_s": t[key][1], "items_s": n * e / t[key][0], "MB_s": mb * e / t[key][0]}
            for name, key, e in (("stream, cold (fetch+xxh3)", "cold", 1),
                                 ("stream, cold (fetch+sha256)", "sha256", 1),
                                 ("stream, cold, zstd shards (xxh3)", "zstd", 1),
                                 ("stream, first epoch (fresh memory)", "first", 1),
                                 ("stream, warm (memory cache)", "warm", epochs),
                                 ("raw memmap gather", "raw", epochs), ("one blob per item", "per-item", 1))]
    item = next(r for r in rows if r["reader"] == "one blob per item")
    for r, key in zip(rows[:5], ("cold", "sha256", "zstd", "first", "warm")):  # per round: over its pair's items/s
        ratios = [[(r["epochs"] / got[i]) / (epochs / base[i]) for i in (0, 1)] for base, got in pairs[key]]
        r.update(vs_raw=float(np.median([w for w, _ in ratios])), vs_per_item=r["items_s"] / item["items_s"],
                 cpu_vs_raw=float(np.median([c for _, c in ratios])))
    rows[0].update(write_s=t_write, memory_held_MB=held, stored_MB=stored["auto"], zstd_stored_MB=stored["zstd"])
    wh.close()
    if s3:
        rows += bench_s3(kind, x, y, batch, tmp, s3)
    return rows


def bench_s3(kind, x, y, batch, tmp: Path, s3: dict) -> list[dict]:
    from mlwarehouse.blobs.s3 import S3BlobStore
    from mlwarehouse.index.sqlite import SQLiteIndex
    from mlwarehouse.warehouse import Warehouse
    store = S3BlobStore(s3["uri"].replace("s3://mlw-test", f"s3://mlw-test/bench-{kind}"),
                        access_key=s3["access_key"], secret_key=s3["secret_key"])
    wh = Warehouse(SQLiteIndex(tmp / f"s3-{kind}.sqlite"), store)
    items = ItemDatasets(wh.project("bench"))
    items.from_arrays(kind, {"x": x, "label": y})
    ds = items.get(kind)
    n, mb = len(x), x.nbytes / 1e6
    cache = ShardCache(tmp / f"cache-{kind}", max_bytes=4 << 30)
    (t_cold, _), _ = run_stream(ds, batch, cache=cache, memory=0)  # no memory cache: the disk cache is measured
    (t_warm, _), _ = run_stream(ds, batch, cache=cache, memory=0)
    sample = min(n, 500)
    keys = [store.put(memoryview(x[i]).cast("B")) for i in range(sample)]
    t_item = timed(lambda: [store.get(k) for k in keys])[0] * n / sample
    out = []
    for name, t in (("stream, disk cache cold", t_cold), ("stream, disk cache warm", t_warm),
                    (f"one blob per item (from {sample})", t_item)):
        out.append({"workload": kind, "store": "s3", "reader": name, "epochs": 1, "items": n, "s": t,
                    "items_s": n / t, "MB_s": mb / t})
    out[0]["vs_per_item"] = t_item / t_cold
    out[1]["vs_per_item"] = t_item / t_warm
    wh.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the item counts")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the raw gather and the warm stream")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every local contender (median kept)")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--prefault-gib", type=int, default=8, help="GiB of memory touched once before measuring")
    args = parser.parse_args()
    prefault_s = prefault(args.prefault_gib)
    server = None
    s3 = None
    if not args.no_s3:
        from mlwarehouse.testing.servers import find_weed, start_seaweedfs
        if find_weed():
            server = start_seaweedfs()
            s3 = {"uri": server.uri, "access_key": server.env["MLW_TEST_S3_ACCESS_KEY"],
                  "secret_key": server.env["MLW_TEST_S3_SECRET_KEY"]}
        else:
            print("no SeaweedFS binary: skipping S3", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="mlw-bench-stream-") as tmp:
            rows = [r for kind in ("a", "b") for r in bench(kind, args.scale, Path(tmp), s3, args.epochs, args.rounds)]
    finally:
        if server:
            from mlwarehouse.testing.processes import stop
            stop(server)
    print(f"local: median of {args.rounds} rounds (x raw: of the ratios to a raw gather run just before each stream); "
          f"raw and warm stream over {args.epochs} epochs, cold stream and per-item over 1; memory cache bound "
          f"{MEMORY_BYTES >> 20} MiB per process; {args.prefault_gib} GiB touched first in {prefault_s:.1f} s; "
          f"{os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'workload':8} {'store':5} {'reader':34} {'epochs':>6} {'items/s':>12} {'MB/s':>9} {'x raw':>7} "
          f"{'cpu x raw':>9} {'x per-item':>10}")
    nan = float("nan")
    for r in rows:
        print(f"{r['workload']:8} {r['store']:5} {r['reader']:34} {r['epochs']:6} {r['items_s']:12,.0f} "
              f"{r['MB_s']:9.1f} {r.get('vs_raw', nan):7.2f} {r.get('cpu_vs_raw', nan):9.2f} "
              f"{r.get('vs_per_item', nan):10.1f}")
    for r in rows:
        if "stored_MB" in r:
            print(f"stored, workload {r['workload']}: {r['stored_MB']:.1f} MB as the dataset's default writes it to a "
                  f"local folder (blocks as they are), {r['zstd_stored_MB']:.1f} MB with compression='zstd'")
    for reader, least in TARGETS:
        r = next(r for r in rows if r["workload"] == "a" and r["store"] == "local" and r["reader"] == reader)
        print(f"target: a, {reader}: >= {least}x raw; got {r['vs_raw']:.2f}x wall-clock, {r['cpu_vs_raw']:.2f}x CPU "
              f"({'met' if r['vs_raw'] >= least else 'missed'})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
