"""The paper's 1B shape pretrained for real on this machine: peak memory per process against the estimate.

    python tools/bench_pretrain_1b.py                       # 2 processes, ZeRO-3, fp32, 4 steps of 2 × 256 tokens
    python tools/bench_pretrain_1b.py --steps 6 --seq-len 512 --zero-stage 3 --out runs/pretrain-1b

It runs `pangu-pi pretrain --config configs/pangu-pi-1b.yaml` (full width and depth) with a short
sequence, a tokenizer trained on the embedded default corpus (its vocabulary replaces the paper's
100,883 entries, as the run's tokenizer decides) and a handful of optimizer steps. While it runs, the
peak resident memory (VmHWM) of every training process is read from /proc; afterwards the figures are
set beside `pangu_pi.training.memory.estimate_memory` for the same run and world size, and beside the
trainer's own tokens/s and MFU from metrics.jsonl. The last line is JSON: `peak_gib_per_process`,
`estimate_gib`, `estimate_over_measured`, `tokens_per_s`, `mfu`.

Two ranks of this shape fit in 24 GiB (8.0 GiB each) with DeepSpeed's live parameters, buckets and
optimizer sub-groups cut below their GPU-sized defaults (the `deepspeed.*` settings below) and glibc's
mmap threshold fixed at 1 MiB for the ranks (`--mmap-threshold`); benchmarks/RESULTS.md ("Real
sizes") has the measured phases behind each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            found.append(c)
            todo.append(c)
    return found


def _is_worker(pid: int) -> bool:
    """A training rank: a process that torchrun started with LOCAL_RANK set (not the launcher itself)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(e.startswith(b"LOCAL_RANK=") for e in env)


class PeakWatcher(threading.Thread):
    """Polls every descendant of `pid`; keeps the highest VmHWM of each training rank."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for p in _descendants(self.pid):
                if p in self.peaks or _is_worker(p):
                    hwm = _status(p).get("VmHWM")
                    if hwm:
                        self.peaks[p] = max(self.peaks.get(p, 0), hwm)
            time.sleep(self.every)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "pretrain-1b"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "pangu-pi-1b.yaml"),
                    help="another preset's recipe, for a smoke test")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=8192, help="of the tokenizer trained for the run")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="glibc's MALLOC_MMAP_THRESHOLD_ for the ranks (bytes)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    sets = {
        "data.datasets": "[]",  # none: the run trains a tokenizer and shards the embedded corpus
        "data.tokenizer": "null",
        "data.tokenizer_vocab_size": args.vocab_size,
        "data.default_corpus_bytes": 3_000_000,
        "data.seq_len": args.seq_len,
        "data.val_fraction": 0.01,
        "batch.global_batch_size": args.micro_batch * args.nproc,
        "batch.micro_batch_size": args.micro_batch,
        "schedule.warmup_steps": 1,
        "train.precision": "fp32",
        "train.zero_stage": args.zero_stage,
        "eval.every": 0,
        "log.tensorboard": "false",
        "log.peak_flops_per_device": 1.0e11,  # one core: 2 AVX2 FMA units, 32 fp32 FLOPs a cycle at ~3 GHz
        "checkpoint.save_every": 10**6,  # the last step is saved anyway
        "checkpoint.resume": "none",
        # DeepSpeed's defaults keep up to 1e9 gathered parameters alive (4 GB in fp32) and use 5e8-element
        # buckets (2 GB touched, and as much again for the reduce-scatter's interleaved copy): sized for an
        # 80 GB GPU, they do not leave two ranks of this shape room in 24 GiB.
        "deepspeed.zero_optimization.stage3_max_live_parameters": 1e8,
        "deepspeed.zero_optimization.stage3_max_reuse_distance": 1e8,
        "deepspeed.zero_optimization.stage3_prefetch_bucket_size": 5e7,
        "deepspeed.zero_optimization.reduce_bucket_size": 5e7,
        # The optimizer gets its gradient as a fresh flat fp32 copy of each sub-group: by default one
        # sub-group holds the whole partition (1.2 GiB here); 5e7 elements bound that copy to 0.2 GiB.
        "deepspeed.zero_optimization.sub_group_size": 5e7,
    }
    cmd = [sys.executable, "-m", "pangu_pi.cli", "pretrain", "--config", args.config,
           "--nproc", str(args.nproc), "--out", str(out), "--max-steps", str(args.steps)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    env = dict(os.environ)
    # glibc serves blocks under its mmap threshold (which grows to 32 MiB as large blocks are freed)
    # from heaps that keep freed memory: the gathered 16 MiB weights and activations left ~3 bytes a
    # parameter resident that no tensor used (measured at 3 layers). A fixed 1 MiB threshold returns them.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(args.mmap_threshold))
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, env=env)
    watcher = PeakWatcher(proc.pid)
    watcher.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    finally:
        watcher.done.set()
        watcher.join()
    wall = time.time() - start
    if rc != 0:
        raise SystemExit(f"pangu-pi pretrain exited with {rc}")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    timed = steps[1:] or steps  # the first step carries one-off set-up costs
    tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]

    from pangu_pi.training.config import load_config
    from pangu_pi.training.memory import estimate_memory

    resolved = load_config(out / "config.yaml") if (out / "config.yaml").exists() else None
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = estimate_memory(resolved, args.nproc, device=device) if resolved is not None else None
    peaks = sorted(watcher.peaks.values(), reverse=True)[: args.nproc]
    print(f"\n{args.nproc} processes, ZeRO-{args.zero_stage}, fp32, {args.micro_batch} × {args.seq_len} tokens each, "
          f"{len(steps)} steps in {wall:.0f} s (set-up included)")
    for i, peak in enumerate(peaks):
        print(f"  process {i}: peak resident {peak / GIB:6.2f} GiB")
    if est is not None:
        print(f"  estimate (training/memory.py), {est.parameters / 1e9:.3f} B parameters:")
        print("  " + est.table().replace("\n", "\n  "))
    losses = ", ".join(f"{r['loss']:.3f}" for r in steps)
    print(f"  losses: {losses}")
    print(f"  tokens/s {tps:.1f}" + (f", MFU {100 * sum(mfu) / len(mfu):.2f}%" if mfu else ""))
    result = {
        "peak_gib_per_process": [round(p / GIB, 3) for p in peaks],
        "estimate_gib": round(est.total / GIB, 3) if est else None,
        "estimate_over_measured": round(est.total / max(peaks), 4) if est and peaks else None,
        "parameters": est.parameters if est else None,
        "tokens_per_s": round(tps, 2),
        "mfu": round(sum(mfu) / len(mfu), 5) if mfu else None,
        "steps": len(steps),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
