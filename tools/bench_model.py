"""PanGu-π against a same-shaped transformers LLaMA: training step and inference forward, in one run.

    python tools/bench_model.py                                   # tiny preset, CPU, fp32
    python tools/bench_model.py --preset pangu-pi-1b --batch 1    # the paper's 1B shape
    python tools/bench_model.py --preset pangu-pi-1b --device cuda --dtype bf16 --batch 4 --seq-len 2048 --optimizer

The paper reports SIAF + augmented shortcut costing +4 % at 1B (Table 4: 7.86 vs 7.56 ms/token).
Both models get the same batch. Each repeat times every model once, in turn, so drift in the
machine's speed hits them alike; the median over repeats is reported. Two measurements:

- training step: forward + backward of the LM loss (and an AdamW step with `--optimizer`);
- inference forward: `torch.no_grad()`, eval mode, no KV cache, the whole batch at once.

`--dtype bf16` runs the step under autocast with fp32 master weights (what mixed-precision training
does). Tokens/s and, where the device's peak is known (CUDA data sheets, or `--peak-flops`), MFU
come from the trainer's own FLOP count. The last line is JSON with `pangu_vs_llama_time` (training
step, PanGu-π time / LLaMA time) and `pangu_vs_llama_forward` (inference forward).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM  # noqa: E402
from pangu_pi.conversion import llama_config_like  # noqa: E402
from pangu_pi.training.metrics import flops_per_token, peak_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_like(config: PanGuPiConfig, attn: str) -> LlamaForCausalLM:
    llama = llama_config_like(config)
    llama._attn_implementation = attn
    return LlamaForCausalLM(llama)


class Timed:
    """One model with its optimizer, timed on the same batch as the others."""

    def __init__(self, model, args, device):
        self.model = model.to(device)
        self.device = device
        self.autocast = (
            torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else contextlib.nullcontext()
        )
        self.optimizer = None
        if args.optimizer:
            fused = device.type == "cuda"
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=fused)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self, ids) -> float:
        self.model.train()
        self._sync()
        start = time.perf_counter()
        with self.autocast:
            loss = self.model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self._sync()
        elapsed = time.perf_counter() - start
        self.model.zero_grad(set_to_none=True)
        return elapsed

    @torch.no_grad()
    def forward(self, ids) -> float:
        self.model.eval()
        self._sync()
        start = time.perf_counter()
        with self.autocast:
            self.model(ids, use_cache=False)
        self._sync()
        return time.perf_counter() - start


def interleaved(models: dict[str, Timed], what: str, ids, warmup: int, repeats: int) -> dict[str, float]:
    for timed in models.values():  # allocator, compilation, autotuning
        for _ in range(warmup):
            getattr(timed, what)(ids)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, timed in models.items():
            times[name].append(getattr(timed, what)(ids))
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step [8 for tiny, else 1]")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats [15 for tiny, else 5]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--siaf-backend", default="auto")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda where available)")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="bf16: autocast, fp32 master weights")
    ap.add_argument("--optimizer", action="store_true", help="include an AdamW step in the training step")
    ap.add_argument("--no-forward", action="store_true", help="time the training step only")
    ap.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (CPU has none)")
    args = ap.parse_args(argv)
    tiny = args.preset == "tiny"
    args.batch = args.batch or (8 if tiny else 1)
    args.repeats = args.repeats or (15 if tiny else 5)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset(args.preset, siaf_backend=args.siaf_backend)
    config._attn_implementation = args.attn
    models = {
        "pangu": Timed(PanGuPiForCausalLM(config), args, device),
        "llama": Timed(llama_like(config, args.attn), args, device),
    }
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    tokens = args.batch * args.seq_len

    step = interleaved(models, "train_step", ids, args.warmup, args.repeats)
    fwd = {} if args.no_forward else interleaved(models, "forward", ids, args.warmup, args.repeats)

    peak = peak_flops(args.peak_flops, args.dtype) if device.type == "cuda" or args.peak_flops else None
    no_shortcut = copy.deepcopy(config)
    no_shortcut.shortcut_count = 0  # the same count for LLaMA: no shortcut matmuls
    flops = {"pangu": flops_per_token(config, args.seq_len), "llama": flops_per_token(no_shortcut, args.seq_len)}
    result = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "tokens": tokens, "siaf_backend": args.siaf_backend,
              "optimizer": args.optimizer}
    print(f"{args.preset}, {device}, {args.dtype}, batch {args.batch} × {args.seq_len}, "
          f"training step{' with AdamW' if args.optimizer else ''}; median of {args.repeats}")
    for name, timed in models.items():
        params = sum(p.numel() for p in timed.model.parameters())
        tps = tokens / step[name]
        line = f"  {name:6s} {params:>14,} params  step {step[name] * 1e3:9.1f} ms  {tps:10.0f} tokens/s"
        result[f"{name}_step_ms"] = round(step[name] * 1e3, 3)
        result[f"{name}_tokens_per_s"] = round(tps, 1)
        if peak:
            mfu = tps * flops[name] / peak
            result[f"{name}_mfu"] = round(mfu, 4)
            line += f"  MFU {100 * mfu:5.1f}%"
        if fwd:
            result[f"{name}_forward_ms"] = round(fwd[name] * 1e3, 3)
            line += f"  inference forward {fwd[name] * 1e3:9.1f} ms"
        print(line)
    result["pangu_vs_llama_time"] = round(step["pangu"] / step["llama"], 4)
    print(f"PanGu-π / LLaMA training-step time: {result['pangu_vs_llama_time']:.3f}x  (paper at 1B: 1.04x)")
    if fwd:
        result["pangu_vs_llama_forward"] = round(fwd["pangu"] / fwd["llama"], 4)
        print(f"PanGu-π / LLaMA inference-forward time: {result['pangu_vs_llama_forward']:.3f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
