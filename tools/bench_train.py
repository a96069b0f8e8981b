"""Training throughput: `pangu-pi pretrain` (DeepSpeed) against a plain PyTorch DDP loop.

Both train the same model from the same initial weights on the same packed samples, with the same
process count, micro-batch, AdamW, LR schedule and gradient clipping, and time each optimizer step
split into data, forward, backward and optimizer. Runs alternate (DDP, pretrain, DDP, pretrain, ...)
so a change in the machine's load hits both; each side's best run counts, over the steps after
`--skip` warm-up steps. Start-up is reported apart: it is paid once per run, not per step.

    python tools/bench_train.py                      # tiny preset, seq 128, 2 processes, ZeRO-2
    python tools/bench_train.py --stage 1 --steps 60 --nproc 2

Prints a table, the ratio, and as its last line one JSON object with `vs_ddp_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("data", "forward", "backward", "optimizer")


def bench_config(args, cache: Path) -> dict:
    return {
        "out": str(cache.parent / "plan"),  # the pretrain side gets --out; the DDP side writes nothing there
        "seed": 0,
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        "data": {"seq_len": args.seq_len, "default_corpus_bytes": 2_000_000, "tokenizer_vocab_size": 8192,
                 "cache_dir": str(cache), "val_fraction": 0.005},
        "batch": {"global_batch_size": args.micro * args.nproc, "micro_batch_size": args.micro},
        "optim": {"lr": 1e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 5},
        "train": {"max_steps": args.steps, "precision": "fp32", "zero_stage": args.stage},
        "checkpoint": {"save_every": 10**6},
        "eval": {"every": 0},
        "log": {"tensorboard": False, "plot": False},
    }


# ------------------------------------------------------------------------------------------------
# The DDP side: one rank of a plain loop, started by pangu_pi.training.launch.spawn_local


def ddp_worker(config_path: str, out_path: str) -> None:
    import random

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from pangu_pi import PanGuPiForCausalLM
    from pangu_pi.training.config import load_config, resolve_batch
    from pangu_pi.training.data import PackedMixture
    from pangu_pi.training.engine import param_groups
    from pangu_pi.training.recipes.pretrain import prepare_run
    from pangu_pi.training.schedule import lr_scheduler, make_schedule

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(config_path)
    plan = prepare_run(config, world, progress=False) if rank == 0 else None
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    plan = box[0]
    split = resolve_batch(config.batch, world)
    model_config = config.model_config(plan.vocab_size)
    model_config.use_cache = False
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = PanGuPiForCausalLM(model_config)
    ddp = DistributedDataParallel(model)
    o = config.optim
    # The trainer's optimizer: torch's fused AdamW (training/core.py), so the comparison is of the loops.
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    sched = lr_scheduler(opt, make_schedule(config.schedule, config.train.max_steps))
    data = PackedMixture(plan.datasets, split="train", seq_len=config.data.seq_len, eos_id=plan.eos_id,
                         vocab_size=plan.vocab_size, tokenizer_hash=plan.tokenizer_hash,
                         val_fraction=config.data.val_fraction, seed=config.seed)
    vocab = model_config.vocab_size
    tokens_per_step = split.global_batch_size * config.data.seq_len
    rows = []
    for step in range(1, config.train.max_steps + 1):
        t_start = time.perf_counter()
        times = dict.fromkeys(PARTS, 0.0)
        losses = []
        for micro in range(split.grad_accum):
            t = time.perf_counter()
            batch = data.next_batch(split.micro_batch_size, rank, world)
            times["data"] += time.perf_counter() - t
            t = time.perf_counter()
            logits = ddp(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
            times["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            if micro < split.grad_accum - 1:
                with ddp.no_sync():
                    (loss / split.grad_accum).backward()
            else:
                (loss / split.grad_accum).backward()
            times["backward"] += time.perf_counter() - t
            losses.append(loss.detach())
        t = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip) if o.grad_clip else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times["optimizer"] += time.perf_counter() - t
        mean = torch.stack(losses).mean().reshape(1)
        dist.all_reduce(mean)
        elapsed = time.perf_counter() - t_start
        rows.append({"step": step, "loss": mean.item() / world, "grad_norm": float(norm) if norm is not None else None,
                     "tokens_per_s": tokens_per_step / elapsed, **{f"{k}_s": v for k, v in times.items()}})
    if rank == 0:
        Path(out_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Both ranks leave together: a rank tearing down gloo while its peer is still writing can leave
    # the peer waiting in destroy_process_group for good.
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The driver


def summarise(rows: list[dict], skip: int, tokens_per_step: int) -> dict:
    kept = [r for r in rows if r["step"] > skip and "loss" in r]
    step_s = [tokens_per_step / r["tokens_per_s"] for r in kept]
    return {
        "tokens_per_s": tokens_per_step * len(kept) / sum(step_s),
        "step_ms": 1000 * statistics.median(step_s),
        **{f"{p}_ms": 1000 * statistics.median(r[f"{p}_s"] for r in kept) for p in PARTS},
        "first_loss": rows[0]["loss"],
    }


def run_ddp(args, config_path: Path, out: Path) -> tuple[list[dict], float]:
    from pangu_pi.training.launch import spawn_local

    t = time.perf_counter()
    code = spawn_local(args.nproc, [sys.executable, __file__, "--ddp-worker", str(config_path), str(out)])
    if code:
        raise SystemExit(f"the DDP run failed with exit code {code}")
    return [json.loads(line) for line in out.read_text().splitlines()], time.perf_counter() - t


def run_pretrain(args, config_path: Path, out: Path) -> tuple[list[dict], float]:
    from pangu_pi.training.metrics import read_metrics

    t = time.perf_counter()
    cmd = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())", "pretrain",
           "--config", str(config_path), "--out", str(out), "--nproc", str(args.nproc), "--no-progress",
           "--resume", "none"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    return read_metrics(out / "metrics.jsonl"), time.perf_counter() - t


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--ddp-worker":
        ddp_worker(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage of the pretrain side")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the figures")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=8, help="sequences per process per step")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_train"))
    args = p.parse_args()

    import shutil

    import yaml

    from pangu_pi.training.config import build_config
    from pangu_pi.training.recipes.pretrain import default_data

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(work))
    config = bench_config(args, work / "cache")
    default_data(build_config(config), work / "cache", progress=True)  # once, outside every timing
    config_path = work / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))
    tokens_per_step = args.micro * args.nproc * args.seq_len

    results: dict[str, list[dict]] = {"ddp": [], "pretrain": []}
    startup: dict[str, list[float]] = {"ddp": [], "pretrain": []}
    for r in range(args.repeats):
        for name, fn in (("ddp", run_ddp), ("pretrain", run_pretrain)):
            out = work / f"{name}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            rows, wall = fn(args, config_path, out if name == "pretrain" else out / "steps.jsonl")
            s = summarise(rows, args.skip, tokens_per_step)
            results[name].append(s)
            startup[name].append(wall - sum(tokens_per_step / x["tokens_per_s"] for x in rows if "loss" in x))
            print(f"{name} run {r + 1}: {s['tokens_per_s']:.0f} tokens/s, wall {wall:.0f} s", flush=True)

    best = {name: max(runs, key=lambda s: s["tokens_per_s"]) for name, runs in results.items()}
    ratio = best["pretrain"]["tokens_per_s"] / best["ddp"]["tokens_per_s"]
    print()
    print(f"tiny preset, seq {args.seq_len}, {args.nproc} processes × {args.micro} sequences, fp32, "
          f"ZeRO-{args.stage} vs DDP; best of {args.repeats}, steps {args.skip + 1}..{args.steps}")
    header = f"{'':<18}{'tokens/s':>10}{'step ms':>9}" + "".join(f"{p + ' ms':>14}" for p in PARTS)
    print(header)
    for name in ("ddp", "pretrain"):
        s = best[name]
        label = "plain DDP" if name == "ddp" else f"pangu-pi ZeRO-{args.stage}"
        parts = "".join(f"{s[p + '_ms']:>14.1f}" for p in PARTS)
        print(f"{label:<18}{s['tokens_per_s']:>10.0f}{s['step_ms']:>9.1f}" + parts)
    print(f"pretrain / DDP tokens/s: {ratio:.3f}x")
    print(f"first-step loss: DDP {best['ddp']['first_loss']:.6f}, pretrain {best['pretrain']['first_loss']:.6f} "
          "(same weights, same samples)")
    print(f"start-up per run (s): DDP {statistics.fmean(startup['ddp']):.1f}, "
          f"pretrain {statistics.fmean(startup['pretrain']):.1f}")
    print(json.dumps({
        "vs_ddp_tokens_per_s": round(ratio, 4),
        "pretrain_tokens_per_s": round(best["pretrain"]["tokens_per_s"], 1),
        "ddp_tokens_per_s": round(best["ddp"]["tokens_per_s"], 1),
        "zero_stage": args.stage,
        "nproc": args.nproc,
        "split_ms": {name: {p: round(best[name][p + "_ms"], 2) for p in PARTS} for name in best},
        "runs_tokens_per_s": {name: [round(s["tokens_per_s"], 1) for s in runs] for name, runs in results.items()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
