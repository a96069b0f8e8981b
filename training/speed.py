"""The trainer's speed features, applied to a built model from outside it (torchtitan's rule: the
model file knows nothing of how it is trained fast).

- `train.activation_checkpointing: none | full | selective` (true/false still mean full/none):
  full recomputes each decoder block's forward in backward; selective checkpoints each block with a
  policy that keeps the output of every matmul and attention kernel and recomputes only the cheap
  elementwise work (norms, RoPE, the SIAF, the shortcut's activation), torchtitan's "op" mode.
- `train.compile`: `torch.compile` of each decoder block (not the whole model: each block is one
  graph, compiled once and reused by every layer of the same shape; the embedding, the loss and
  DeepSpeed's hooks stay eager).
- `train.fused_loss`: the LM head and cross-entropy as one chunked op that never holds the full
  logits (pangu_pi/kernels/linear_cross_entropy.py). Under ZeRO-3 the head's weight is gathered only
  inside the head's own forward, which the fused loss does not call: it is registered as an
  external parameter of the model that owns the head, so the model's forward gathers it.
- Data: batches pinned and read one micro-batch ahead on a thread on CUDA (`prefetching`), so the
  host-to-device copy is asynchronous; on CPU the stream is used as it is.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from pangu_pi.config import ConfigError

AC_MODES = ("none", "full", "selective")


def ac_mode(value: Any) -> str:
    """`train.activation_checkpointing` as one of AC_MODES (true → full, false → none)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value.lower() in AC_MODES:
        return value.lower()
    raise ConfigError(f"train.activation_checkpointing must be none, full or selective "
                      f"(true/false mean full/none), got {value!r}")


# ------------------------------------------------------------------------------------------------
# Activation checkpointing


def _saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels (their
    recomputation is most of a block's FLOPs); those missing from this torch build are skipped."""
    import torch

    aten = torch.ops.aten
    names = [("mm", "default"), ("addmm", "default"), ("bmm", "default"),
             ("_scaled_dot_product_flash_attention", "default"),
             ("_scaled_dot_product_efficient_attention", "default"),
             ("_scaled_dot_product_cudnn_attention", "default"),
             ("_scaled_dot_product_flash_attention_for_cpu", "default")]
    ops = set()
    for op, overload in names:
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload):
            ops.add(getattr(packet, overload))
    return ops


def selective_checkpoint_context():
    """The (forward, recompute) context pair torch.utils.checkpoint takes as `context_fn`."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model, mode: Any) -> str:
    """Checkpoint every decoder block (transformers' GradientCheckpointingLayer) per `mode`."""
    mode = ac_mode(mode)
    if mode == "none":
        return mode
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_checkpoint_context
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return mode


# ------------------------------------------------------------------------------------------------
# Compilation


def decoder_blocks(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_compile(model, enabled: bool = True) -> int:
    """`torch.compile` each decoder block in place (`Module.compile`: the parameter names, and so
    checkpoints, stay as they are). Returns the number of blocks compiled."""
    if not enabled:
        return 0
    blocks = decoder_blocks(model)
    for block in blocks:
        # dynamic=False: every micro-batch has the same shape in training, and a static graph lets
        # the compiler pick fixed tiles; a shape change (evaluation's last partial batch) recompiles.
        block.compile(dynamic=False)
    return len(blocks)


# ------------------------------------------------------------------------------------------------
# The fused loss


def causal_lm(model):
    """The PanGu-π causal LM inside `model` (itself, or under a PEFT wrapper), or None."""
    from pangu_pi.modeling import PanGuPiForCausalLM

    for m in model.modules():
        if isinstance(m, PanGuPiForCausalLM):
            return m
    return None


def apply_fused_loss(model, enabled: bool, zero_stage: int) -> bool:
    """Switch the model's loss (when it is given labels) to the fused one."""
    lm = causal_lm(model)
    if lm is None:
        return False
    lm.fused_loss = bool(enabled)
    if enabled and zero_stage == 3:
        import deepspeed

        # The fused loss reads lm_head.weight in the causal LM's forward, not lm_head's: under ZeRO-3
        # that weight is a partition there unless the causal LM's forward gathers it too.
        deepspeed.zero.register_external_parameter(lm, lm.lm_head.weight)
    return bool(enabled)


# ------------------------------------------------------------------------------------------------
# Everything above, in the order torchtitan applies it: checkpointing, then compilation.


def apply_speed_features(model, train_config, zero_stage: int | None = None) -> dict:
    """Apply `train.activation_checkpointing`, `train.compile` and `train.fused_loss` to a built
    model, before DeepSpeed wraps it. Returns what was applied, for the run's log."""
    stage = train_config.zero_stage if zero_stage is None else zero_stage
    applied = {"activation_checkpointing": apply_activation_checkpointing(model, train_config.activation_checkpointing)}
    applied["fused_loss"] = apply_fused_loss(model, getattr(train_config, "fused_loss", False), stage)
    applied["compiled_blocks"] = apply_compile(model, getattr(train_config, "compile", False))
    return applied


# ------------------------------------------------------------------------------------------------
# Data


def pin(batch):
    """A batch (tensor, or dict/list of tensors) in page-locked memory, so a copy to the GPU with
    non_blocking=True is asynchronous."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin(v) for v in batch)
    return batch


def to_device(batch, device):
    """A batch on `device`: pinned and copied asynchronously to a GPU; as it is on CPU."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return batch
    if isinstance(batch, torch.Tensor):
        return (batch if batch.is_pinned() else batch.pin_memory()).to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class PrefetchingStream:
    """A training stream read one micro-batch ahead on a thread, its batches pinned.

    The stream's batches are a pure function of the sample position (`batch(start, n)`), so reading
    ahead changes nothing in what is trained: `next_batch` returns what the stream's own would and
    advances `samples_consumed` the same way, and a checkpoint saves that position, not the one read
    ahead. Everything else (`state_dict`, `load_state_dict`, ...) is the stream's.
    """

    def __init__(self, stream, pin_batches: bool = True):
        self._stream = stream
        self._pin = pin_batches
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[tuple[int, int], concurrent.futures.Future] | None = None

    def _read(self, start: int, n: int):
        batch = self._stream.batch(start, n)
        return pin(batch) if self._pin else batch

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1):
        start = self._stream.samples_consumed + rank * n
        if self._ahead is not None and self._ahead[0] == (start, n):
            batch = self._ahead[1].result()
        else:  # first call, or the position moved (a resume loaded another state)
            batch = self._read(start, n)
        self._stream.samples_consumed += n * world_size
        following = self._stream.samples_consumed + rank * n
        self._ahead = ((following, n), self._pool.submit(self._read, following, n))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def prefetching(stream, device):
    """`stream` read ahead and pinned on CUDA; unchanged on CPU or where batches are not a pure
    function of the position (no `batch(start, n)`)."""
    if getattr(device, "type", device) != "cuda" or not hasattr(stream, "batch"):
        return stream
    return PrefetchingStream(stream)


def selective_elements_per_token_per_layer(config) -> int:
    """Elements a block keeps per token under selective checkpointing: its input (the checkpoint's)
    and the outputs of its matmuls and attention (training/memory.py's estimate reads this)."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    w = config.shortcut_count * config.shortcut_width
    attention = d + (q + 2 * kv) + q + d  # input; q, k, v projections; attention output; o_proj
    shortcut = w + config.shortcut_count * d  # squeeze and expand outputs
    ffn = 2 * f + d  # gate and up projections, down projection
    return attention + shortcut + ffn
