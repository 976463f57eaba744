"""What the benchmarks do to the machine before they measure, so that both sides of a ratio meet it alike."""

from __future__ import annotations

import subprocess
import sys
import time

__all__ = ["prefault"]


def prefault(gib: int) -> float:
    """Touch ``gib`` GiB of fresh memory in a child process, which frees it by exiting; seconds taken.

    On a virtual machine the first write into memory the guest never touched also costs the hypervisor's fault
    (measured here: 2.4 s per GiB the first time, 0.2 s after). Without this, that cost lands on whichever contender
    first grows its heap or the page cache into such memory. A child does it, so that no measured process inherits
    its peak resident set."""
    start = time.perf_counter()
    if gib > 0:
        touch = f"import numpy as n; held = [n.ones(1 << 30, n.uint8) for _ in range({gib})]"
        subprocess.run([sys.executable, "-c", touch], check=True)
    return time.perf_counter() - start
