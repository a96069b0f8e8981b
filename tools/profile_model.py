"""Where a training step and a decode step spend their time: PanGu-π and the same-shaped LLaMA.

    python tools/profile_model.py --preset pangu-pi-1b            # batch 1 × 256 training step, decode at context 256
    python tools/profile_model.py --preset tiny --json-out runs/profile.json

Each model runs one warm-up and then one profiled training step (forward + backward of the LM loss)
and one profiled decode step (one new token against a KV cache of `--context` tokens) under
torch.profiler. Every operator's own time is charged to the part of the model it ran for:

- forward operators by the module they ran inside (hooks open a profiler range per module);
- backward operators by the forward operator that created their autograd node: the profiler gives
  both the same sequence number, so the shortcut's and the SIAF's backward count as theirs.

Parts: `gate_activation` (PanGu-π: the SIAF and its product with the up projection; LLaMA: the
SiLU, whose product with the up projection counts under `mlp_matmuls`), `shortcut` (the
augmented shortcut's bottleneck), `attention` (q/k/v/o projections, RoPE, SDPA), `mlp_matmuls`
(gate/up/down projections), `norms`, `head_loss` (embedding, final norm, LM head, loss) and `other`.
The paper's Table 4 reports SIAF +2.6 % and the shortcut +1.3 % of latency at 1B. The last line is
JSON with each model's shares and, as the paper counts them, the cost of each addition relative to
LLaMA's step: `siaf_cost` ((PanGu-π gate activation − LLaMA's) / LLaMA's total) and `shortcut_cost`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM  # noqa: E402
from tools.bench_model import llama_like  # noqa: E402

SCOPE = "part::"
PARTS = ("gate_activation", "shortcut", "attention", "mlp_matmuls", "norms", "head_loss", "other")


def _part_of(name: str, module) -> str | None:
    kind = type(module).__name__
    if kind.endswith("SIAF") or name.endswith("act_fn"):  # PanGu-π's SIAF (with its product), LLaMA's SiLU
        return "gate_activation"
    if kind.endswith("Shortcut") or ".shortcut" in name:
        return "shortcut"
    if name.endswith("self_attn"):
        return "attention"
    if name.endswith(".mlp"):
        return "mlp_matmuls"
    if kind.endswith("RMSNorm"):
        return "norms"
    return None


def label_modules(model) -> list:
    """Open a profiler range `part::NAME` around every module that belongs to a part."""
    handles = []
    for name, module in model.named_modules():
        part = _part_of(name, module)
        if part is None:
            continue
        ranges = []

        def pre(mod, args, _part=part, _ranges=ranges):
            rf = record_function(SCOPE + _part)
            rf.__enter__()
            _ranges.append(rf)

        def post(mod, args, out, _ranges=ranges):
            _ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _forward_part(event) -> str:
    node = event
    while node is not None:
        if node.name.startswith(SCOPE):
            return node.name[len(SCOPE):]
        node = node.cpu_parent
    return "head_loss"  # outside every labelled module: embedding, final norm, LM head, loss


def shares(prof) -> dict[str, float]:
    """Microseconds of operator self time per part."""
    events = prof.events()
    seq_part: dict[int, str] = {}
    for e in events:  # forward operators: the part whose range encloses them
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            seq_part.setdefault(e.sequence_nr, _forward_part(e))
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(SCOPE):
            continue
        node, part = e, None
        while node is not None:  # a backward operator: the part of the forward op behind its autograd node
            if node.name.startswith("autograd::engine::evaluate_function"):
                part = seq_part.get(node.sequence_nr, "other")
                break
            node = node.cpu_parent
        totals[part or _forward_part(e)] += e.self_cpu_time_total
    return dict(totals)


def train_step(model, ids):
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def decode_step(model, ids, context: int):
    model.eval()
    out = model(ids[:, :context], use_cache=True)
    cache = out.past_key_values

    def one():
        model(ids[:, context : context + 1], past_key_values=cache, use_cache=True)
        cache.crop(context)

    return one


def profile_model(name, model, train_ids, decode_ids, context: int, top: int) -> dict:
    handles = label_modules(model)
    result = {}
    try:
        for what in ("train", "decode"):
            fn = (lambda: train_step(model, train_ids)) if what == "train" else decode_step(model, decode_ids, context)
            fn()  # warm-up: allocator, compiled kernels
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            parts = shares(prof)
            total = sum(parts.values())
            result[what] = {p: round(parts.get(p, 0.0) / total, 4) for p in PARTS}
            result[what + "_ms"] = round(total / 1e3, 1)
            print(f"\n{name}, {what} step: {total / 1e3:.1f} ms of operator time")
            for p in PARTS:
                if parts.get(p):
                    print(f"  {p:<12} {parts[p] / 1e3:9.1f} ms  {100 * parts[p] / total:5.1f}%")
            print("  top operators by own time:")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
            print("\n".join("    " + line for line in table.splitlines()))
    finally:
        for h in handles:
            h.remove()
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=256, help="KV-cache length of the decode step")
    ap.add_argument("--siaf-backend", default="auto")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--models", default="pangu,llama")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset(args.preset, siaf_backend=args.siaf_backend)
    config._attn_implementation = "sdpa"
    train_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    decode_ids = torch.randint(0, config.vocab_size, (args.batch, args.context + 1))
    result = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "context": args.context}
    for name in args.models.split(","):
        model = PanGuPiForCausalLM(config) if name == "pangu" else llama_like(config, "sdpa")
        result[name] = profile_model(name, model, train_ids, decode_ids, args.context, args.top)
        del model
    if "pangu" in result and "llama" in result:
        print("\nCost of each addition relative to LLaMA's step (paper, Table 4: SIAF +2.6%, shortcut +1.3%):")
        for what in ("train", "decode"):
            p, q = result["pangu"], result["llama"]
            pms, qms = p[what + "_ms"], q[what + "_ms"]
            siaf = (p[what]["gate_activation"] * pms - q[what]["gate_activation"] * qms) / qms
            shortcut = p[what]["shortcut"] * pms / qms
            result[what + "_siaf_cost"] = round(siaf, 4)
            result[what + "_shortcut_cost"] = round(shortcut, 4)
            result[what + "_pangu_vs_llama_op_time"] = round(pms / qms, 4)
            print(f"  {what:6s} SIAF {100 * siaf:+5.1f}%  shortcut {100 * shortcut:+5.1f}%  "
                  f"total {100 * (pms / qms - 1):+5.1f}%")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
