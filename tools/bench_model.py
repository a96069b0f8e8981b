"""Forward+backward time of PanGu-π against a same-shaped transformers LLaMA, in one run.

The paper reports SIAF + augmented shortcut costing +4 % at 1B (Table 4: 7.86 vs 7.56 ms/token).
Both models get the same batch; timings alternate between them so drift in the machine's speed
hits both alike; the median of the repeats is reported. Last line: JSON with `pangu_vs_llama_time`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.conversion import llama_config_like


def llama_like(config: PanGuPiConfig) -> LlamaForCausalLM:
    llama = llama_config_like(config)
    llama._attn_implementation = "sdpa"
    return LlamaForCausalLM(llama)


def step_time(model, ids) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--siaf-backend", default="auto")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset(args.preset, siaf_backend=args.siaf_backend)
    models = {"pangu": PanGuPiForCausalLM(config).train(), "llama": llama_like(config).train()}
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    for model in models.values():  # warm-up: allocator, any compilation
        for _ in range(3):
            step_time(model, ids)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_time(model, ids))
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq_len
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for name in models:
        print(f"{name:6s} {params[name]:>12,} params  fwd+bwd {med[name] * 1e3:8.1f} ms  "
              f"{tokens / med[name]:10.0f} tokens/s")
    ratio = med["pangu"] / med["llama"]
    print(f"PanGu-π / LLaMA time: {ratio:.3f}x  (paper at 1B: 1.04x; aim <= 1.15x)")
    print(json.dumps({"pangu_vs_llama_time": round(ratio, 4), "preset": args.preset, "tokens": tokens,
                      "siaf_backend": args.siaf_backend}))


if __name__ == "__main__":
    main()
