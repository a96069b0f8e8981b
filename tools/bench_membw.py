"""Memory bandwidth of this machine as torch sees it: the ceiling for decoding, which reads every weight
once per step.

Two measurements over a tensor much larger than the caches, each with one thread and with all threads:
a read (`sum`, bytes read / time) and a copy (`copy_`, bytes read + written / time). The read is
the one to put beside a decode step's weight traffic, which is almost all reads.

    python tools/bench_membw.py                 # 1 GiB tensors, 5 repeats, median
    python tools/bench_membw.py --gib 2 --repeats 7

The last line printed is JSON (`read_bytes_per_s_1t`, `read_bytes_per_s_all`, `copy_bytes_per_s_...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # touch the pages and warm the code path
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(gib: float = 1.0, repeats: int = 5, threads: list[int] | None = None) -> dict:
    """Read and copy bandwidth in bytes/s for each thread count (default: 1 and all cores)."""
    cores = os.cpu_count() or 1
    threads = threads or sorted({1, cores})
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    before = torch.get_num_threads()
    out: dict = {"tensor_bytes": nbytes, "repeats": repeats}
    try:
        for t in threads:
            torch.set_num_threads(t)
            tag = "1t" if t == 1 else ("all" if t == cores else f"{t}t")
            out[f"read_bytes_per_s_{tag}"] = nbytes / _median_seconds(lambda: src.sum(), repeats)
            out[f"copy_bytes_per_s_{tag}"] = 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeats)
    finally:
        torch.set_num_threads(before)
    out["threads"] = threads
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="size of each tensor (two are allocated)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    result = measure(args.gib, args.repeats)
    for key, value in result.items():
        if "_per_s_" in key:
            print(f"{key:>24}: {value / 1e9:6.1f} GB/s")
    print(f"load average: {open('/proc/loadavg').read().strip()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
