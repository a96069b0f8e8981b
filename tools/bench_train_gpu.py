"""The trainer's own speed on one GPU: `pangu-pi pretrain` of the 1B preset against a LLaMA of the same
shape through the same trainer, with tokens/s, MFU and peak memory beside the memory estimate.

    python tools/bench_train_gpu.py                                  # GPU: 1B, vocab 100,883, 4 × 4096, bf16, ZeRO-1
    python tools/bench_train_gpu.py --steps 30 --compile --set train.activation_checkpointing=selective
    python tools/bench_train_gpu.py --preset tiny --steps 3 --seq-len 64 --micro-batch 2   # CPU smoke

Each model trains in a child process through the library call behind `pangu-pi pretrain`
(`pangu_pi.training.pretrain.pretrain`, one process, no launcher), on a tokenizer and shards made
once from the embedded default corpus (`--cache`); the model's vocabulary is set to `--vocab-size`
(100,883, the paper's) whatever the tokenizer's size, so the LM head and the loss cost what they
cost at full size. The child reports the trainer's metrics.jsonl and its peak memory
(`torch.cuda.max_memory_allocated` on a GPU; the process's peak RSS on CPU), which is set beside
`training/memory.py`'s estimate for the same run config.

The LLaMA is an identity-configured PanGu-π: one SIAF term with a = 1, b = 0 (a single SiLU, through
the same SIAF op) and no augmented shortcut, so it has exactly LLaMA's weights and FLOPs and runs
through the same code. Its SIAF coefficients (two scalars) are trained too, which costs nothing.

Step time and tokens/s are averaged over the steps after `--warmup-steps` (compilation, allocator
warm-up); MFU is the trainer's (training/flops.py: 6·N + attention, against the device's peak or
`--peak-flops`). By default the last checkpoint is not written (`--save` writes it): the benchmark
measures training, and a 1B checkpoint with its optimizer state is ~17 GB of disk writes.

The last line of stdout is one JSON object: `mfu`, `tokens_per_s_per_gpu`, `pangu_vs_llama_step_time`,
`peak_mem_gib`, `peak_mem_vs_estimate` (PanGu-π's), then the same figures for each model and the
run's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3

# An identity-configured PanGu-π: exactly LLaMA's function, weights and FLOPs.
LLAMA = {"model.siaf_terms": 1, "model.siaf_init": "identity", "model.siaf_param_shape": "scalar",
         "model.shortcut_count": 0}


def run_overrides(args) -> dict:
    sets = {
        "model.preset": args.preset,
        "model.vocab_size": args.vocab_size,
        "data.datasets": [],  # the embedded default corpus, tokenized once into --cache
        "data.tokenizer": None,
        "data.tokenizer_vocab_size": args.tokenizer_vocab_size,
        "data.default_corpus_bytes": args.corpus_bytes,
        "data.cache_dir": str(Path(args.cache).resolve()),
        "data.seq_len": args.seq_len,
        "batch.micro_batch_size": args.micro_batch,
        "batch.grad_accum": args.grad_accum,
        "schedule.warmup_steps": 1,
        "train.max_steps": args.steps,
        "train.precision": args.precision,
        "train.zero_stage": args.zero_stage,
        "train.compile": args.compile,
        "train.log_every": 1,
        "eval.every": 0,
        "log.tensorboard": False,
        "log.plot": False,
        "checkpoint.save_every": 10**9,
        "checkpoint.resume": "none",
    }
    if args.peak_flops:
        sets["log.peak_flops_per_device"] = args.peak_flops
    if args.fused_loss is not None:
        sets["train.fused_loss"] = args.fused_loss
    return sets


def to_config(sets: dict, extra: list[str], out: Path):
    from pangu_pi.overrides import deep_merge, parse_override
    from pangu_pi.training.config import build_config

    values: dict = {}
    for key, value in sets.items():
        values = deep_merge(values, _tree(key, value))
    for item in extra:
        values = deep_merge(values, parse_override(item))
    values["out"] = str(out)
    return build_config(values, recipe="pretrain")


def _tree(key: str, value) -> dict:
    node: dict = {}
    root = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


# ------------------------------------------------------------------------------------------------
# The child: one training run through the trainer, its figures as JSON


def child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from pangu_pi.training.pretrain import pretrain

    out = Path(spec["out"])
    config = to_config(spec["sets"], spec["extra"], out)
    if not spec["save"]:
        _skip_checkpoint_writes(out)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    summary = pretrain(config, progress=False)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        import resource

        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_mem_bytes": peak, "peak_reserved_bytes": reserved, "loss": summary.get("loss"),
                      "device": torch.cuda.get_device_name() if on_gpu else "cpu"}))
    return 0


def _skip_checkpoint_writes(out: Path) -> None:
    """The trainer saves its last step; a benchmark of training does not need those ~17 GB of writes."""
    from pangu_pi.training import checkpoint

    def not_written(*args, **kwargs):
        return out / "checkpoint-not-written"

    checkpoint.save_checkpoint = not_written


def loss_probe(kind: str, tokens: int, hidden: int, vocab: int, dtype: str) -> dict:
    """Peak memory and time of one forward + backward of the LM head's loss alone (fused or plain),
    above what its inputs and the head's gradient take; run in a fresh process per kind."""
    import time

    import torch

    from pangu_pi.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    h = torch.randn(tokens, hidden, device=device, dtype=dt, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dt) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    # the gradients' own storage, which both kinds end with, is not what is compared
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    fn = linear_cross_entropy if kind == "fused" else linear_cross_entropy_reference
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_status("VmRSS")
    start = time.perf_counter()
    fn(h, w, labels).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status("VmHWM")
    return {"kind": kind, "tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": dtype,
            "peak_above_inputs_gib": (peak - base) / GIB, "seconds": time.perf_counter() - start,
            "device": str(device)}


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


# ------------------------------------------------------------------------------------------------
# The parent: both runs, the figures side by side


def measure(rows: list[dict], warmup: int) -> dict:
    """Mean step time, tokens/s per GPU and MFU over the steps after `warmup` (or the last if fewer)."""
    steps = [r for r in rows if "loss" in r and "tokens_per_s" in r and not r.get("skipped")]
    kept = steps[warmup:] or steps[-1:]
    if not kept:
        raise RuntimeError("the run logged no step")
    per_gpu_key = "tokens_per_s_per_gpu" if "tokens_per_s_per_gpu" in kept[0] else "tokens_per_s"  # one process
    # Every step trains as many tokens: the mean rate is the harmonic mean of the steps' rates.
    tokens_per_s = len(kept) / sum(1.0 / r[per_gpu_key] for r in kept)
    # MFU is tokens/s per GPU × FLOPs per token / peak: the same rate, times the trainer's constant.
    mfu = tokens_per_s * kept[-1]["mfu"] / kept[-1][per_gpu_key] if kept[-1].get("mfu") is not None else None
    return {"tokens_per_s_per_gpu": tokens_per_s, "mfu": mfu,
            "steps_measured": len(kept), "final_loss": steps[-1]["loss"]}


def run_one(name: str, sets: dict, args, work: Path) -> dict:
    out = work / name
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"out": str(out), "sets": sets, "extra": args.set, "save": args.save}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench_train_gpu: the {name} run failed (exit {proc.returncode}); its output is above")
    child_out = json.loads(proc.stdout.strip().splitlines()[-1])
    from pangu_pi.training.metrics import read_metrics

    figures = measure(read_metrics(out / "metrics.jsonl"), args.warmup_steps)
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    figures["step_time_s"] = tokens_per_step / figures["tokens_per_s_per_gpu"]
    figures["peak_mem_gib"] = child_out["peak_mem_bytes"] / GIB
    figures["peak_reserved_gib"] = child_out["peak_reserved_bytes"] / GIB
    figures["device"] = child_out["device"]
    estimate = estimate_bytes(sets, args, out)
    figures["estimate_gib"] = estimate / GIB
    figures["peak_mem_vs_estimate"] = child_out["peak_mem_bytes"] / estimate
    return figures


def estimate_bytes(sets: dict, args, out: Path) -> float:
    from pangu_pi.training.memory import estimate_memory

    config = to_config(sets, args.set, out)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return estimate_memory(config, 1, vocab_size=args.vocab_size, device=device).total


def loss_comparison(argv: list[str] | None) -> dict:
    """`--loss-only`: each kind in a fresh process, so one's peak cannot hide the other's."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--loss-only"]
    runs = {}
    for kind in ("plain", "fused"):
        proc = subprocess.run([sys.executable, __file__, *argv, "--loss-probe", kind], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_train_gpu: the {kind} loss probe failed:\n{proc.stderr[-3000:]}")
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{kind}: peak {runs[kind]['peak_above_inputs_gib']:.2f} GiB above the inputs, "
              f"{runs[kind]['seconds']:.2f} s", flush=True)
    result = {"fused_peak_gib": runs["fused"]["peak_above_inputs_gib"],
              "plain_peak_gib": runs["plain"]["peak_above_inputs_gib"],
              "fused_vs_plain_time": runs["fused"]["seconds"] / runs["plain"]["seconds"], **{k: runs["fused"][k]
              for k in ("tokens", "vocab", "hidden", "dtype", "device")}}
    print(json.dumps(result), flush=True)
    return result


def _default_fused_loss() -> bool:
    from pangu_pi.training.config import TrainConfig

    return TrainConfig().fused_loss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pangu-pi-1b")
    ap.add_argument("--vocab-size", type=int, default=100_883, help="the model's (the LM head's) vocabulary")
    ap.add_argument("--tokenizer-vocab-size", type=int, default=8192, help="of the tokenizer made from the corpus")
    ap.add_argument("--corpus-bytes", type=int, default=3_000_000, help="of the embedded corpus to tokenize")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the averages")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--fused-loss", dest="fused_loss", action="store_true", default=None, help="train.fused_loss=true")
    ap.add_argument("--no-fused-loss", dest="fused_loss", action="store_false", help="train.fused_loss=false")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s of one device (default: the device table)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other run config key")
    ap.add_argument("--no-llama", action="store_true", help="PanGu-π only (no ratio)")
    ap.add_argument("--save", action="store_true", help="write the last checkpoint, as a real run does")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench_train_gpu"), help="tokenizer and shards")
    ap.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--loss-only", action="store_true",
                    help="only the LM head's loss, fused against plain: peak memory and time of one forward + "
                         "backward of micro-batch × seq-len tokens at the preset's width and --vocab-size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--loss-probe", choices=("fused", "plain"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        raise SystemExit(child(args.child))
    if args.loss_probe or args.loss_only:
        from pangu_pi import PanGuPiConfig

        hidden = PanGuPiConfig.from_preset(args.preset).hidden_size
        probe = (args.micro_batch * args.seq_len, hidden, args.vocab_size, args.precision)
        if args.loss_probe:
            print(json.dumps(loss_probe(args.loss_probe, *probe)), flush=True)
            raise SystemExit(0)
        return loss_comparison(argv)

    sets = run_overrides(args)
    with tempfile.TemporaryDirectory(prefix="bench_train_gpu.") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pangu = run_one("pangu", sets, args, work)
        llama = None if args.no_llama else run_one("llama", {**sets, **LLAMA}, args, work)
    result = {
        "mfu": pangu["mfu"],
        "tokens_per_s_per_gpu": pangu["tokens_per_s_per_gpu"],
        "pangu_vs_llama_step_time": pangu["step_time_s"] / llama["step_time_s"] if llama else None,
        "peak_mem_gib": pangu["peak_mem_gib"],
        "peak_mem_vs_estimate": pangu["peak_mem_vs_estimate"],
        "pangu": pangu,
        "llama": llama,
        "settings": {"preset": args.preset, "vocab_size": args.vocab_size, "seq_len": args.seq_len,
                     "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "steps": args.steps,
                     "warmup_steps": args.warmup_steps, "precision": args.precision, "zero_stage": args.zero_stage,
                     "compile": args.compile, "fused_loss": sets.get("train.fused_loss", _default_fused_loss()),
                     "set": args.set, "llama": "identity-configured PanGu-π (1 SIAF term, a=1, b=0; no shortcut)"},
    }
    for name, fig in (("PanGu-π", pangu), ("LLaMA", llama)):
        if fig:
            mfu = f"{100 * fig['mfu']:.1f}%" if fig["mfu"] is not None else "n/a (no known peak)"
            print(f"{name}: {fig['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
                  f"step {fig['step_time_s'] * 1e3:.1f} ms, MFU {mfu}, peak {fig['peak_mem_gib']:.2f} GiB "
                  f"(estimate {fig['estimate_gib']:.2f}), {fig['device']}", flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
