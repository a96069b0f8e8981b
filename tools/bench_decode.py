"""Decode latency per token: PanGu-π-7B's 29 layers against LLaMA-2-7B's 32, as the paper compares them.

    python tools/bench_decode.py                          # bf16 weights, each model with its own vocabulary
    python tools/bench_decode.py --vocab 32000            # reduced-vocabulary twins: only the layers differ
    python tools/bench_decode.py --pangu-preset pangu-pi-1b --llama-layers 12 --dtype fp32

The paper (Table 5) measures 43.0 ms a token for PanGu-π-7B against 47.6 ms for LLaMA-2-7B
(0.90×): same width (4096) and FFN (11008), 29 layers instead of 32. Here both are built with random
weights, one at a time so only one is in memory (a 7B model in bf16 takes ~13.5 GB), given a short
prompt, and then decode one token at a time against their KV cache (batch 1, greedy, the HF model
with SDPA attention). The figure is the median over the timed tokens.

Two loops per model:
- eager: the HF model as a user calls it, dynamic KV cache;
- graphed: a static KV cache and `torch.compile(model.forward, fullgraph=True)` of the decode step;
  on CUDA with mode="reduce-overhead" (CUDA graphs: one replay a token), on CPU plain inductor (there
  is no graph to replay there: the figure measures the compiled code, not launch overhead).
On CUDA every step ends with a synchronisation (the next token is known when the step's kernels are
done), so a figure is a token's latency, not the CPU's launch rate.

`decode_bw_fraction` = weight bytes read per token / graphed ms per token, as a fraction of the
memory bandwidth: the data-sheet figure where the card is known (H200: 4.8 TB/s), else `--peak-gbps`,
else (CPU) a measured copy of a large tensor, counted read + write; `bw_reference` says which.

The last line is JSON with `pangu_ms_per_token`, `llama_ms_per_token`, `pangu_vs_llama_decode`
(eager, as before), `pangu_vs_llama_decode_eager`, `pangu_vs_llama_decode_graphed`, the graphed
`*_graphed_ms_per_token` and `decode_bw_fraction` (PanGu-π, graphed).

    python tools/bench_decode.py --quick                  # tiny preset, fp32, a few tokens: a smoke test
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


# Data-sheet HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name().
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_ms(model, vocab: int, prompt: int, tokens: int, warmup: int) -> tuple[float, list[float]]:
    """Eager decode: the model as a user calls it, dynamic KV cache."""
    device = model.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(warmup + tokens):
        _sync(device)
        start = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, [t * 1e3 for t in times]


@torch.inference_mode()
def graphed_decode_ms(model, vocab: int, prompt: int, tokens: int, warmup: int) -> tuple[float, list[float]]:
    """Static KV cache + torch.compile(fullgraph) of the forward; CUDA graphs on CUDA."""
    from transformers import StaticCache

    device = model.device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + warmup + tokens + 4)
    out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead" if cuda else None)
    # Compilation (and CUDA-graph recording) happens in the first calls: at least two warm-up steps.
    times = []
    for i in range(max(warmup, 2) + tokens):
        position = torch.tensor([prompt + i], device=device)
        _sync(device)
        start = time.perf_counter()
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = step(nxt, past_key_values=cache, cache_position=position, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # a fresh tensor: the graph's output buffer is reused
        _sync(device)
        if i >= max(warmup, 2):
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, [t * 1e3 for t in times]


def copy_gbps(device: torch.device, nbytes: int = 1 << 28) -> float:
    """A same-device copy of a large tensor, counted read + write, median of 5."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def bandwidth_reference(device: torch.device, peak_gbps: float | None) -> tuple[float, str]:
    if peak_gbps:
        return peak_gbps, "--peak-gbps"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbps in PEAK_GBPS.items():
            if key in name:
                return gbps, f"data sheet ({key})"
    return copy_gbps(device), f"measured {device.type} copy (read + write)"


def build(kind: str, args, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 7B weights ever exists
    try:
        return _build(kind, args)
    finally:
        torch.set_default_dtype(previous)


def _build(kind: str, args):
    with torch.device(args.device):  # initialised where it runs: no 13.5 GB host copy to move
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
    return model.eval(), config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pangu-preset", "--preset", dest="pangu_preset", default="pangu-pi-7b")
    ap.add_argument("--llama-layers", type=int, default=None, help="LLaMA's depth [32, LLaMA-2-7B's]")
    ap.add_argument("--llama-like-pangu", action="store_true", help="LLaMA with the PanGu-π preset's width and heads")
    ap.add_argument("--vocab", type=int, default=None, help="one vocabulary for both (reduced-vocabulary twins)")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-graphed", action="store_true", help="skip the static-cache compiled loop")
    ap.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth for decode_bw_fraction")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny preset, LLaMA of the same shape, fp32, vocab 512, 3 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.pangu_preset, args.llama_like_pangu, args.dtype, args.vocab = "tiny", True, "fp32", 512
        args.llama_layers = args.llama_layers or PanGuPiConfig.from_preset("tiny").num_hidden_layers
        args.prompt, args.tokens, args.warmup = 8, 3, 1
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)

    result = {"dtype": args.dtype, "prompt": args.prompt, "tokens": args.tokens, "vocab": args.vocab,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": args.pangu_preset}
    loops = [("eager", decode_ms)] + ([] if args.no_graphed else [("graphed", graphed_decode_ms)])
    # Both eager figures first, then both graphed ones (each compiles a whole model): a run cut short by
    # a time limit loses the last graphed figure, not an eager one. One model in memory at a time.
    for loop, fn in loops:
        for kind in ("pangu", "llama"):
            t0 = time.perf_counter()
            model, config = build(kind, args, dtype)
            params = model.num_parameters()
            built = time.perf_counter() - t0
            weight_gb = params * torch.finfo(dtype).bits / 8 / 1e9
            result.update({f"{kind}_layers": config.num_hidden_layers, f"{kind}_params": params,
                           f"{kind}_weight_gb": round(weight_gb, 4)})
            ms, all_ms = fn(model, config.vocab_size, args.prompt, args.tokens, args.warmup)
            print(f"{kind:6s} {loop:7s} {config.num_hidden_layers} layers × {config.hidden_size}, vocab "
                  f"{config.vocab_size:,}: {params / 1e9:.3f} B parameters ({weight_gb:.2f} GB), "
                  f"built in {built:.0f} s; decode {ms:.2f} ms/token (median of {args.tokens}; "
                  f"{min(all_ms):.2f}-{max(all_ms):.2f}), {weight_gb / (ms / 1e3):.1f} GB/s of weights read")
            suffix = "" if loop == "eager" else "_graphed"
            result.update({f"{kind}{suffix}_ms_per_token": round(ms, 3),
                           f"{kind}{suffix}_weight_gb_per_s": round(weight_gb / (ms / 1e3), 2)})
            # A JSON line after every measurement: a run cut short by a time limit keeps what it measured.
            print(json.dumps({**result, "partial": True}), flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["pangu_vs_llama_decode"] = round(result["pangu_ms_per_token"] / result["llama_ms_per_token"], 4)
    result["pangu_vs_llama_decode_eager"] = result["pangu_vs_llama_decode"]
    print(f"PanGu-π / LLaMA decode latency, eager: {result['pangu_vs_llama_decode']:.3f}x "
          f"(paper, Table 5: 43.0 / 47.6 ms = {43.0 / 47.6:.3f}x)")
    if not args.no_graphed:
        ratio = result["pangu_graphed_ms_per_token"] / result["llama_graphed_ms_per_token"]
        result["pangu_vs_llama_decode_graphed"] = round(ratio, 4)
        gbps, source = bandwidth_reference(device, args.peak_gbps)
        result["bw_reference_gbps"], result["bw_reference"] = round(gbps, 1), source
        result["decode_bw_fraction"] = round(result["pangu_graphed_weight_gb_per_s"] / gbps, 4)
        print(f"PanGu-π / LLaMA decode latency, static cache + compiled: {ratio:.3f}x; PanGu-π reads its "
              f"weights at {result['decode_bw_fraction']:.1%} of {gbps:.0f} GB/s ({source})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
