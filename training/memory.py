"""How much memory one GPU (or, on a CPU-only machine, one process) needs for a pretraining run,
computed from the run config and the DeepSpeed config the trainer builds from it.

Usage: `python -m pangu_pi.training.memory --config configs/pangu-pi-7b.yaml --gpus 64`
(`--device cpu` for a run on processors alone, where the process itself is the device's memory).

The estimate adds, per GPU, following DeepSpeed's own layout (deepspeed/runtime/zero/stage_1_and_2.py
and stage3.py):
- weights in the compute dtype, whole or (ZeRO-3) one partition, and under ZeRO-3 the gathered
  full weights that may stay live (at most `stage3_max_live_parameters` plus one prefetch bucket);
- gradients, whole (ZeRO-1) or one partition (ZeRO-2/3);
- AdamW's states, partitioned at every stage: an fp32 master copy (a separate tensor even when the
  weights are fp32), m and v (created at the first step, so the first step's peak is the steady one);
- the flat fp32 gradient the optimizer steps on: DeepSpeed flattens a fresh copy of each group's
  gradient partition (under ZeRO-3 one `sub_group_size` sub-group at a time);
- the optimizer's temporaries: none for torch's fused AdamW (the trainer's default), two flat fp32
  tensors the size of that group (sqrt(v) and its quotient) for the unfused one;
- activations kept for backward, counted tensor by tensor for a PanGu-π block with fused (SDPA /
  flash) attention, so no seq² term; with activation checkpointing only each block's input is kept,
  plus one block's activations while it is recomputed; under `train.sequence_parallel: N` each rank
  keeps 1/N of every sequence's tokens (Ulysses trades the split of tokens for a split of heads in
  attention, the same number of elements), and the batch splits over world / N data-parallel ranks;
- the logits and their fp32 loss copies, which at a 100k vocabulary rival a block's activations;
- DeepSpeed's gradient bucket and, under ZeRO-3, the reduce-scatter's interleaved copy of it (each
  capped by the parameter count: a bucket holds at most every gradient); below ZeRO-3 the all-gather
  bucket too;
- on a CPU-only machine, the process's own baseline (the interpreter with torch, DeepSpeed and
  transformers loaded, their gloo process group: 0.45 GiB measured).
Measured against a 2-process ZeRO-3 run of the 1B shape on CPU (benchmarks/RESULTS.md, "Real sizes").
Not counted: allocator fragmentation (glibc's heaps kept ~3 bytes a parameter of freed blocks resident
until MALLOC_MMAP_THRESHOLD_ was fixed at 1 MiB) and, on a GPU, the CUDA context (~0.5-1 GiB);
plan for 10-15 % headroom.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pangu_pi.overrides import add_set_argument
from pangu_pi.parameters import count_parameters

from .config import resolve_batch
from .engine import deepspeed_config

GIB = 1024**3


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


CPU_PROCESS_BASELINE = int(0.45 * GIB)  # RSS of a rank after imports and init_distributed (gloo), measured


@dataclass
class MemoryEstimate:
    parameters: int
    world_size: int
    zero_stage: int
    weights: float
    gathered: float
    gradients: float
    optimizer: float
    gradient_copy: float
    optimizer_temporaries: float
    activations: float
    logits: float
    buffers: float
    baseline: float = 0.0
    sequence_parallel: int = 1

    @property
    def total(self) -> float:
        return (self.weights + self.gathered + self.gradients + self.optimizer + self.gradient_copy
                + self.optimizer_temporaries + self.activations + self.logits + self.buffers + self.baseline)

    def rows(self) -> list[tuple[str, float]]:
        rows = [
            ("weights", self.weights),
            ("gathered weights", self.gathered),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("flat fp32 gradient", self.gradient_copy),
            ("optimizer temporaries", self.optimizer_temporaries),
            ("activations", self.activations),
            ("logits + loss", self.logits),
            ("communication buckets", self.buffers),
            ("process baseline", self.baseline),
            ("total", self.total),
        ]
        # rows that are always zero for this stage or device only clutter the table
        return [(name, value) for name, value in rows
                if value or name not in ("gathered weights", "optimizer temporaries", "process baseline")]

    def table(self) -> str:
        unit = "per process" if self.baseline else "per GPU"  # only CPU runs carry the process baseline
        lines = [f"| {unit:<22} | {'GiB':>7} |", f"|{'-' * 24}|{'-' * 9}|"]
        lines += [f"| {name:<22} | {value / GIB:7.1f} |" for name, value in self.rows()]
        return "\n".join(lines)


def estimate_memory(run_config, world_size: int, vocab_size: int | None = None, device: str = "cuda") -> MemoryEstimate:
    """Bytes per GPU for `run_config` (a pangu_pi.training.config.RunConfig) on `world_size` GPUs;
    `device="cpu"` for a CPU-only run (DeepSpeed's CPU settings and the process baseline)."""
    model = run_config.model_config(vocab_size)
    sp = getattr(run_config.train, "sequence_parallel", 1)
    if world_size % sp:
        from pangu_pi.config import ConfigError

        raise ConfigError(f"train.sequence_parallel {sp} does not divide the {world_size} GPUs; pick a divisor")
    split = resolve_batch(run_config.batch, world_size // sp)  # the batch splits over the DP ranks
    on_gpu = device != "cpu"
    ds = deepspeed_config(run_config, split, on_gpu)  # the trainer's own, with the run's overrides
    zero = ds.get("zero_optimization", {})
    P = count_parameters(model)["total"]
    stage, n = run_config.train.zero_stage, world_size
    half = run_config.train.precision == "bf16"
    b = 2 if half else 4  # compute dtype: weights, gradients, activations, buckets
    offload = bool(run_config.train.offload_optimizer)

    weights = b * P / (n if stage >= 3 else 1)
    gradients = b * P / (n if stage >= 2 else 1)
    gathered = 0.0
    if stage >= 3:
        live = float(zero.get("stage3_max_live_parameters", 1e9)) + float(zero.get("stage3_prefetch_bucket_size", 5e7))
        gathered = b * min(P, live)
    # fp32 master copy, m and v, always partitioned; in host memory when offloaded
    optimizer = 0.0 if offload else 12 * P / n
    # the flat fp32 gradient the optimizer steps on, and the unfused AdamW's two temporaries of that size
    group = P / n if stage < 3 else min(P / n, float(zero.get("sub_group_size", 1e9)))
    gradient_copy = 0.0 if offload else 4 * group
    fused = ds.get("optimizer", {}).get("params", {}).get("fused", False)
    optimizer_temporaries = 0.0 if offload or fused else 8 * group

    tokens = split.micro_batch_size * run_config.data.seq_len // sp  # this rank's slice of each sequence
    per_layer = activation_elements_per_token_per_layer(model) * tokens * b
    layers = model.num_hidden_layers
    from .speed import ac_mode, selective_elements_per_token_per_layer

    checkpointing = ac_mode(run_config.train.activation_checkpointing)
    if checkpointing == "full":
        activations = layers * tokens * model.hidden_size * b + per_layer
    elif checkpointing == "selective":  # each block keeps its matmul outputs; one block recomputes the rest
        activations = layers * tokens * selective_elements_per_token_per_layer(model) * b + per_layer
    else:
        activations = layers * per_layer
    if getattr(run_config.train, "fused_loss", False):
        # one chunk of fp32 logits (turned into their gradient in place) and its copy in the compute
        # dtype, the fp32 buffer the head's gradient accumulates in, and the hidden states' gradient
        from pangu_pi.kernels.linear_cross_entropy import default_chunk_size

        chunk = default_chunk_size(tokens, model.vocab_size)
        logits = (chunk * model.vocab_size * (4 + b) + 4 * model.vocab_size * model.hidden_size
                  + tokens * model.hidden_size * b)
    else:
        # logits in the compute dtype, their fp32 copy for the loss, and that copy's gradient
        logits = tokens * model.vocab_size * (b + 4 + 4)

    # A bucket never holds more than every gradient (or weight), however large it is configured:
    # DeepSpeed allocates the configured size, but only the part it fills becomes resident.
    reduce_bucket = min(P, float(zero.get("reduce_bucket_size", 5e8)))
    if stage >= 3:
        # the contiguous gradient bucket, and the interleaved copy reduce_scatter_coalesced makes of it
        buffers = 2 * reduce_bucket * b
    else:
        buffers = (reduce_bucket + min(P, float(zero.get("allgather_bucket_size", 5e8)))) * b
    baseline = 0.0 if on_gpu else float(CPU_PROCESS_BASELINE)
    return MemoryEstimate(P, n, stage, weights, gathered, gradients, optimizer, gradient_copy,
                          optimizer_temporaries, activations, logits, buffers, baseline, sp)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m pangu_pi.training.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True,
                        help="all GPUs of all nodes (data parallel × train.sequence_parallel)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a run on processors alone")
    add_set_argument(parser, "override config keys, e.g. train.zero_stage=3")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    est = estimate_memory(config, args.gpus, device=args.device)
    print(f"{args.config}: {est.parameters / 1e9:.2f} B parameters, ZeRO-{est.zero_stage}, "
          f"{config.train.precision}, {args.gpus} {'processes' if args.device == 'cpu' else 'GPUs'}"
          + (f", sequence parallel {est.sequence_parallel} (data parallel {args.gpus // est.sequence_parallel})"
             if est.sequence_parallel > 1 else ""))
    print(est.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
