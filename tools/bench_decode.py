"""Decode latency per token: PanGu-π-7B's 29 layers against LLaMA-2-7B's 32, as the paper compares them.

    python tools/bench_decode.py                          # bf16 weights, each model with its own vocabulary
    python tools/bench_decode.py --vocab 32000            # reduced-vocabulary twins: only the layers differ
    python tools/bench_decode.py --pangu-preset pangu-pi-1b --llama-layers 12 --dtype fp32

The paper (Table 5) measures 43.0 ms a token for PanGu-π-7B against 47.6 ms for LLaMA-2-7B
(0.90×): same width (4096) and FFN (11008), 29 layers instead of 32. Here both are built with random
weights, one at a time so only one is in memory (a 7B model in bf16 takes ~13.5 GB), given a short
prompt, and then decode one token at a time against their KV cache (batch 1, greedy, the HF model
with SDPA attention). The figure is the median over the timed tokens. The last line is JSON with
`pangu_ms_per_token`, `llama_ms_per_token` and `pangu_vs_llama_decode`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# LLaMA-2-7B (Touvron et al., 2023): 32 layers, width 4096, FFN 11008, 32 heads, 32,000 tokens.
LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


@torch.inference_mode()
def decode_ms(model, vocab: int, prompt: int, tokens: int, warmup: int) -> tuple[float, list[float]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(warmup + tokens):
        start = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, [t * 1e3 for t in times]


def build(kind: str, args, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 7B weights ever exists
    try:
        if kind == "pangu":
            overrides = {"vocab_size": args.vocab} if args.vocab else {}
            config = PanGuPiConfig.from_preset(args.pangu_preset, **overrides)
            config._attn_implementation = "sdpa"
            model = PanGuPiForCausalLM(config)
        else:
            shape = dict(LLAMA2_7B)
            if args.llama_layers:
                shape["num_hidden_layers"] = args.llama_layers
            if args.llama_like_pangu:
                p = PanGuPiConfig.from_preset(args.pangu_preset)
                shape.update(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                             num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads)
            if args.vocab:
                shape["vocab_size"] = args.vocab
            config = LlamaConfig(**shape)
            config._attn_implementation = "sdpa"
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pangu-preset", default="pangu-pi-7b")
    ap.add_argument("--llama-layers", type=int, default=None, help="LLaMA's depth [32, LLaMA-2-7B's]")
    ap.add_argument("--llama-like-pangu", action="store_true", help="LLaMA with the PanGu-π preset's width and heads")
    ap.add_argument("--vocab", type=int, default=None, help="one vocabulary for both (reduced-vocabulary twins)")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]

    result = {"dtype": args.dtype, "prompt": args.prompt, "tokens": args.tokens, "vocab": args.vocab}
    for kind in ("pangu", "llama"):
        t0 = time.perf_counter()
        model, config = build(kind, args, dtype)
        params = model.num_parameters()
        built = time.perf_counter() - t0
        ms, all_ms = decode_ms(model, config.vocab_size, args.prompt, args.tokens, args.warmup)
        weight_gb = params * torch.finfo(dtype).bits / 8 / 1e9
        print(f"{kind:6s} {config.num_hidden_layers} layers × {config.hidden_size}, vocab {config.vocab_size:,}: "
              f"{params / 1e9:.2f} B parameters ({weight_gb:.1f} GB), built in {built:.0f} s; decode "
              f"{ms:.1f} ms/token (median of {args.tokens}; {min(all_ms):.1f}-{max(all_ms):.1f}), "
              f"{weight_gb / (ms / 1e3):.1f} GB/s of weights read")
        result.update({f"{kind}_ms_per_token": round(ms, 2), f"{kind}_layers": config.num_hidden_layers,
                       f"{kind}_params": params, f"{kind}_weight_gb_per_s": round(weight_gb / (ms / 1e3), 2)})
        del model
        gc.collect()
    result["pangu_vs_llama_decode"] = round(result["pangu_ms_per_token"] / result["llama_ms_per_token"], 4)
    print(f"PanGu-π / LLaMA decode latency: {result['pangu_vs_llama_decode']:.3f}x "
          f"(paper, Table 5: 43.0 / 47.6 ms = {43.0 / 47.6:.3f}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
