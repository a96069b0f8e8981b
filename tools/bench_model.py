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

    clock = staticmethod(time.perf_counter)  # set to time.process_time by --clock cpu

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self, ids) -> float:
        self.model.train()
        self._sync()
        start = self.clock()
        with self.autocast:
            loss = self.model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self._sync()
        elapsed = self.clock() - start
        self.model.zero_grad(set_to_none=True)
        return elapsed

    @torch.no_grad()
    def forward(self, ids) -> float:
        self.model.eval()
        self._sync()
        start = self.clock()
        with self.autocast:
            self.model(ids, use_cache=False)
        self._sync()
        return self.clock() - start


@contextlib.contextmanager
def pangu_variant(model, shortcut: bool = True, siaf: bool = True):
    """PanGu-π with its augmented shortcuts taken out and/or its SIAF replaced by LLaMA's SiLU(gate)·up,
    on the same weights: what is left of the gap to LLaMA once an addition is gone is not its cost."""
    saved = []
    for layer in model.model.layers:
        saved.append(layer.augmented_shortcuts)
        if not shortcut:
            layer.augmented_shortcuts = torch.nn.ModuleList()
        if not siaf:
            layer.mlp.siaf.forward = lambda gate, up: torch.nn.functional.silu(gate) * up
    try:
        yield
    finally:
        for layer, shortcuts in zip(model.model.layers, saved):
            layer.augmented_shortcuts = shortcuts
            layer.mlp.siaf.__dict__.pop("forward", None)


class Variant:
    """A `Timed` model run under `pangu_variant` (a second view of the same model, no second copy)."""

    def __init__(self, timed: Timed, **switches):
        self.timed, self.switches = timed, switches

    def train_step(self, ids) -> float:
        with pangu_variant(self.timed.model, **self.switches):
            return self.timed.train_step(ids)

    def forward(self, ids) -> float:
        with pangu_variant(self.timed.model, **self.switches):
            return self.timed.forward(ids)


def interleaved(models: dict, what: str, ids, warmup: int, repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Median time per model, and every repeat's times.

    The order reverses from one repeat to the next (A B, B A, A B, ...): a model that always ran
    first, or always right after the other freed its gradients, would carry that position's cost.
    """
    names = list(models)
    for r in range(warmup):  # allocator, compilation, autotuning
        for name in names if r % 2 == 0 else names[::-1]:
            getattr(models[name], what)(ids)
    times = {name: [] for name in models}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(getattr(models[name], what)(ids))
    return {name: statistics.median(t) for name, t in times.items()}, times


def paired_ratio(times: dict[str, list], name: str, base: str = "llama") -> float:
    """Median over repeats of this repeat's time ratio: each pair ran back to back, under the same load."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


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
    ap.add_argument("--ablate", action="store_true",
                    help="also time PanGu-π without its shortcuts, with SiLU for SIAF, and with neither "
                    "(same weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: the process's CPU time instead of wall time; with --threads 1, a step's own work, "
                    "which the machine's other load barely changes (CPU device only)")
    ap.add_argument("--llama-first", action="store_true", help="build (allocate) LLaMA before PanGu-π")
    args = ap.parse_args(argv)
    tiny = args.preset == "tiny"
    args.batch = args.batch or (8 if tiny else 1)
    args.repeats = args.repeats or (15 if tiny else 5)
    return args


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if device.type != "cpu":
            raise SystemExit("--clock cpu measures CPU time: only for --device cpu")
        Timed.clock = staticmethod(time.process_time)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset(args.preset, siaf_backend=args.siaf_backend)
    config._attn_implementation = args.attn
    build = {"pangu": lambda: PanGuPiForCausalLM(config), "llama": lambda: llama_like(config, args.attn)}
    order = ["llama", "pangu"] if args.llama_first else ["pangu", "llama"]
    built = {name: Timed(build[name](), args, device) for name in order}
    models = {"pangu": built["pangu"], "llama": built["llama"]}
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    tokens = args.batch * args.seq_len
    timing = models
    if args.ablate:
        timing = {**models, "pangu_no_shortcut": Variant(models["pangu"], shortcut=False),
                  "pangu_silu": Variant(models["pangu"], siaf=False),
                  "pangu_silu_no_shortcut": Variant(models["pangu"], shortcut=False, siaf=False)}  # fmt: skip

    load = [_loadavg()]
    step, step_times = interleaved(timing, "train_step", ids, args.warmup, args.repeats)
    fwd, fwd_times = ({}, {}) if args.no_forward else interleaved(timing, "forward", ids, args.warmup, args.repeats)
    load.append(_loadavg())

    peak = peak_flops(args.peak_flops, args.dtype) if device.type == "cuda" or args.peak_flops else None
    no_shortcut = copy.deepcopy(config)
    no_shortcut.shortcut_count = 0  # the same count for LLaMA: no shortcut matmuls
    flops = {"pangu": flops_per_token(config, args.seq_len), "llama": flops_per_token(no_shortcut, args.seq_len)}
    result = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "tokens": tokens, "siaf_backend": args.siaf_backend,
              "optimizer": args.optimizer, "threads": torch.get_num_threads(), "built_first": order[0],
              "clock": args.clock, "load_average_start": load[0], "load_average_end": load[1]}
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
    result["pangu_vs_llama_time_paired"] = round(paired_ratio(step_times, "pangu"), 4)
    print(f"PanGu-π / LLaMA training-step time: {result['pangu_vs_llama_time']:.3f}x  (paper at 1B: 1.04x); "
          f"median of per-repeat ratios {result['pangu_vs_llama_time_paired']:.3f}x")
    if fwd:
        result["pangu_vs_llama_forward"] = round(fwd["pangu"] / fwd["llama"], 4)
        result["pangu_vs_llama_forward_paired"] = round(paired_ratio(fwd_times, "pangu"), 4)
        print(f"PanGu-π / LLaMA inference-forward time: {result['pangu_vs_llama_forward']:.3f}x; "
              f"median of per-repeat ratios {result['pangu_vs_llama_forward_paired']:.3f}x")
    for name in timing:
        if name.startswith("pangu_"):  # the ablations: what is left of the gap without each addition
            result[f"{name}_vs_llama_time"] = round(paired_ratio(step_times, name), 4)
            line = f"  {name:24s} / LLaMA: training step {result[f'{name}_vs_llama_time']:.3f}x"
            if fwd:
                result[f"{name}_vs_llama_forward"] = round(paired_ratio(fwd_times, name), 4)
                line += f", inference forward {result[f'{name}_vs_llama_forward']:.3f}x"
            print(line + " (per-repeat ratios, median)")
    for what, times in (("training step", step_times), ("inference forward", fwd_times)):
        for name, ts in times.items():  # every repeat, in the order run (A B, B A, ...), for the record
            print(f"  {what} ms, {name}: {' '.join(f'{t * 1e3:.1f}' for t in ts)}")
    print(f"  load average at start and end: {load[0]} {load[1]}; {torch.get_num_threads()} threads")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
