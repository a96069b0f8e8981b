"""How much memory one GPU needs for a pretraining run, computed from the run config.

Usage: `python -m pangu_pi.training.memory --config configs/pangu-pi-7b.yaml --gpus 64`

The estimate adds, per GPU:
- model states: weights, gradients and AdamW states (fp32 master copy, m, v), each divided by
  the data-parallel size where the ZeRO stage partitions it (stage 1: optimizer; 2: + gradients;
  3: + weights);
- activations kept for backward, counted tensor by tensor for a PanGu-π block with fused (SDPA /
  flash) attention, so no seq² term; with activation checkpointing only each block's input is kept,
  plus one block's activations while it is recomputed;
- the logits and their fp32 loss copies, which at a 100k vocabulary rival a block's activations;
- DeepSpeed's communication buckets.
Allocator fragmentation and the CUDA context (~1-3 GiB) come on top; plan for 10-15 % headroom.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3


def count_parameters(config) -> dict[str, int]:
    """Parameters of a PanGuPiForCausalLM from its config alone (under ZeRO-3 the model's own tensors are empty)."""
    d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    siaf_shape = f if config.siaf_param_shape == "channel" else 1
    siaf = config.siaf_terms * siaf_shape * (3 if config.siaf_learn_weight else 2)
    per_layer = {
        "attention": 2 * d * q + 2 * d * kv,
        "shortcuts": config.shortcut_count * 2 * d * config.shortcut_width,
        "mlp": 3 * d * f,
        "siaf": siaf,
        "norms": 2 * d,
    }
    counts = {name: L * n for name, n in per_layer.items()}
    counts["embedding"] = V * d
    counts["lm_head"] = 0 if config.tie_word_embeddings else V * d
    counts["final_norm"] = d
    counts["total"] = sum(counts.values())
    return counts


def activation_elements_per_token_per_layer(config) -> int:
    """Elements one block keeps for backward, per token (inputs of every matmul and nonlinearity)."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    w = config.shortcut_count * config.shortcut_width
    attention = d + d + (q + 2 * kv) + q  # block input, normed input, rotated q/k/v, attention output
    shortcut = 2 * w  # bottleneck pre- and post-activation
    ffn = d + d + 3 * f + config.siaf_terms * f  # residual, normed, gate/up/product, one pre-activation per term
    return attention + shortcut + ffn


@dataclass
class MemoryEstimate:
    parameters: int
    world_size: int
    zero_stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.buffers

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("logits + loss", self.logits),
            ("communication buckets", self.buffers),
            ("total", self.total),
        ]

    def table(self) -> str:
        lines = [f"| {'per GPU':<22} | {'GiB':>7} |", f"|{'-' * 24}|{'-' * 9}|"]
        lines += [f"| {name:<22} | {value / GIB:7.1f} |" for name, value in self.rows()]
        return "\n".join(lines)


def estimate_memory(run_config, world_size: int, vocab_size: int | None = None) -> MemoryEstimate:
    """Bytes per GPU for `run_config` (a pangu_pi.training.config.RunConfig) on `world_size` GPUs."""
    from .config import resolve_batch

    model = run_config.model_config(vocab_size)
    split = resolve_batch(run_config.batch, world_size)
    P = count_parameters(model)["total"]
    stage, n = run_config.train.zero_stage, world_size
    half = run_config.train.precision == "bf16"
    weight_bytes = 2 if half else 4
    # AdamW's m and v in fp32, plus an fp32 master copy of the weights (DeepSpeed keeps one for fp32 too).
    optimizer_bytes = 12
    weights = weight_bytes * P / (n if stage >= 3 else 1)
    gradients = weight_bytes * P / (n if stage >= 2 else 1)
    optimizer = 0.0 if run_config.train.offload_optimizer else optimizer_bytes * P / n

    tokens = split.micro_batch_size * run_config.data.seq_len
    per_layer = activation_elements_per_token_per_layer(model) * tokens * weight_bytes
    layers = model.num_hidden_layers
    if run_config.train.activation_checkpointing:
        activations = layers * tokens * model.hidden_size * weight_bytes + per_layer
    else:
        activations = layers * per_layer
    # logits in the compute dtype, their fp32 copy for the loss, and that copy's gradient
    logits = tokens * model.vocab_size * (weight_bytes + 4 + 4)

    zero = run_config.deepspeed.get("zero_optimization", {})
    reduce_bucket = float(zero.get("reduce_bucket_size", 5e8))
    gather_bucket = float(zero.get("allgather_bucket_size", 5e8)) if stage < 3 else float(
        zero.get("stage3_prefetch_bucket_size", 5e7))
    buffers = (reduce_bucket + gather_bucket) * weight_bytes
    return MemoryEstimate(P, n, stage, weights, gradients, optimizer, activations, logits, buffers)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m pangu_pi.training.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel size (all GPUs of all nodes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    est = estimate_memory(config, args.gpus)
    print(f"{args.config}: {est.parameters / 1e9:.2f} B parameters, ZeRO-{est.zero_stage}, "
          f"{config.train.precision}, {args.gpus} GPUs")
    print(est.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
