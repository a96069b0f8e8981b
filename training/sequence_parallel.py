"""Sequence parallelism (`train.sequence_parallel: N`): one sequence split over N ranks, on DeepSpeed's
Ulysses for HF models (ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`).

Every rank of an SP group holds 1/N of each sequence's tokens for everything but attention; in each
attention call DeepSpeed's all-to-all trades the sequence split for a head split, so every rank
attends over all the tokens on 1/N of the heads, and a second all-to-all trades back. Ranks
r·N … r·N+N-1 form SP group r (DeepSpeed's layout); the data-parallel degree is world / N.

What this module adds around DeepSpeed's pieces, and why:

- Data: the streams are addressed by sample index, so every rank of an SP group reads the same
  samples itself (the stream is given the DP rank and DP world) and keeps its own slice of the
  tokens (`shard`). No gather: DeepSpeed's UlyssesSPDataLoaderAdapter gathers one batch per SP rank
  and deals them out, which ties which rank computes which sample to N; reading by index keeps the
  data position one number whatever N (a run resumes under another N at the exact sample).
- Documents: the packed rows keep their per-document `position_ids` (RoPE positions restart per
  document) and each rank passes its slice; DeepSpeed gathers them in every attention call. Its
  wrapper drops the attention mask (it was built for the local slice), so on SDPA the core attention
  registered here (`ATTENTION`) rebuilds the block-causal mask of the whole sequence from the
  gathered positions, the same mask the unsplit run builds (training/documents.block_causal_mask); a
  single document per row keeps SDPA's `is_causal` path. Flash attention reads the document
  boundaries from the positions itself. Eager and flex attention are refused (DeepSpeed's flex path
  rebuilds a plain causal mask, which would join documents).
- Loss: each rank sums its slice's token losses and divides by the group's count of counted tokens
  (`num_items_in_batch`, one all-reduce of a count), so the N ranks' gradients add up to the whole
  sequence's mean-loss gradient; DeepSpeed then sums gradients over all ranks and divides by the DP
  degree. The value a rank reports is the group's whole loss (its slice's part plus the others',
  detached), so the core's logged mean is the unsplit run's.
- DPO: a pair's loss needs each row's whole log-probability; each rank sums its slice's and the sums
  are all-reduced with autograd (`sequence_logps`), so every rank computes the same loss, and
  backward runs on loss / N because the all-reduce's backward adds the N ranks' gradients.
- Evaluation is not split: DeepSpeed's wrapper is off in eval (`disable_in_eval`), so every rank
  scores whole held-out sequences as the evaluation code shards them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from pangu_pi.errors import UserError

ATTENTION = "sdpa_documents"  # the core attention SP runs on SDPA (documents masked from positions)
RECIPES = ("pretrain", "full", "lora", "dpo")  # the recipes that can split their sequences


@dataclass
class SequenceParallel:
    size: int
    rank: int  # within the SP group
    dp_rank: int
    dp_world: int
    group: Any
    mpu: Any  # DeepSpeed's SP state (parallel_state_sp) as deepspeed.initialize takes it (see `setup`)
    attention: str  # the attention implementation name DeepSpeed's wrapper took over

    # -- data ------------------------------------------------------------------------------------

    def shard(self, tensors: dict) -> dict:
        """This rank's slice, along the sequence, of every (B, T, ...) tensor."""
        out = {}
        for k, v in tensors.items():
            chunk = v.shape[1] // self.size
            # contiguous: the collectives (DeepSpeed gathers the position ids) take no strided views
            out[k] = v[:, chunk * self.rank:chunk * (self.rank + 1)].contiguous()
        return out

    # -- loss ------------------------------------------------------------------------------------

    def causal_lm_loss(self, engine, input_ids, shift_labels, position_ids=None, ignore_index: int = -100):
        """(loss, tokens on this rank) for one micro-batch of whole sequences, computed on this rank's
        slice: the value is the group's mean token loss, the gradient this slice's share of it."""
        import torch
        import torch.distributed as dist

        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        local = self.shard({"input_ids": input_ids, "shift_labels": shift_labels, "position_ids": position_ids})
        counted = (local["shift_labels"] != ignore_index).sum().to(torch.float32).reshape(1)
        dist.all_reduce(counted, group=self.group)
        part = engine(input_ids=local["input_ids"], position_ids=local["position_ids"],
                      shift_labels=local["shift_labels"], num_items_in_batch=counted.clamp(min=1)[0]).loss
        whole = part.detach().clone()
        dist.all_reduce(whole, group=self.group)
        return part + (whole - part.detach()), int(local["input_ids"].numel())

    def sequence_logps(self, engine, input_ids, shift_labels, ignore_index: int = -100):
        """(Σ log-probs of the counted tokens, their count) per row of whole, right-padded sequences,
        each rank scoring its slice; the sums are all-reduced over the group with autograd, so a loss
        built from them is the same on every rank (see `group_loss` for its gradient)."""
        import torch
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_nn
        import torch.nn.functional as F

        pad = -input_ids.shape[1] % self.size  # right padding to a multiple of N: never attended, not counted
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=0)
            shift_labels = F.pad(shift_labels, (0, pad), value=ignore_index)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        local = self.shard({"input_ids": input_ids, "shift_labels": shift_labels, "position_ids": positions})
        logits = engine(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        targets = local["shift_labels"]
        per_token = -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=ignore_index, reduction="none").view(targets.shape)
        counts = (targets != ignore_index).sum(-1)
        dist.all_reduce(counts, group=self.group)
        sums = per_token.sum(-1)
        sums = dist_nn.all_reduce(sums, group=self.group) if sums.requires_grad else _summed(sums, self.group)
        return sums, counts

    def group_loss(self, loss):
        """A loss computed identically on every rank of the group from `sequence_logps`' sums: the
        all-reduce's backward adds the N ranks' gradients, so backward runs on loss / N; the value
        stays the loss."""
        part = loss / self.size
        return part + (loss - part).detach()

    def describe(self) -> str:
        return (f"sequence parallel: {self.size} ranks per sequence (DeepSpeed Ulysses on {self.attention!r}), "
                f"data parallel over {self.dp_world}")


def _summed(tensor, group):
    import torch.distributed as dist

    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, group=group)
    return tensor


# ------------------------------------------------------------------------------------------------
# Checks before compute


def check(config, world_size: int, model_config) -> None:
    """Refuse, in one line, a `train.sequence_parallel` the run cannot take."""
    n = config.train.sequence_parallel
    if n == 1:
        return
    fix = "set train.sequence_parallel to a divisor of it (1 turns it off)"
    mode = "pretrain" if config.recipe == "pretrain" else config.finetune.mode
    if mode not in RECIPES:
        raise UserError(f"train.sequence_parallel {n}: the {mode} recipe cannot split its sequences (it "
                        "generates them token by token); sequence parallelism runs pretraining, SFT (full, lora) "
                        "and DPO; set train.sequence_parallel=1")
    if config.train.zero_stage == 3:
        # Under ZeRO-3 the model is built inside zero.Init from a config read without the SP groups,
        # and the split run does not come through (tried on CPU/gloo: it stalls); not offered until it does.
        raise UserError(f"train.sequence_parallel {n} does not run with train.zero_stage 3 in this version; use "
                        "train.zero_stage 2 (gradients and optimizer state still partitioned over every process) "
                        "or train.sequence_parallel=1")
    if world_size % n:
        raise UserError(f"train.sequence_parallel {n} does not divide the {world_size} processes; {fix}, or "
                        f"launch a multiple of {n} processes")
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % n:
        raise UserError(f"train.sequence_parallel {n} does not divide the model's {heads} attention heads; {fix}")
    if kv % n:
        raise UserError(f"train.sequence_parallel {n} does not divide the model's {kv} KV heads; {fix}")
    seq = config.data.seq_len
    if seq % n:
        raise UserError(f"train.sequence_parallel {n} does not divide data.seq_len {seq}; pick a seq_len that "
                        f"is a multiple of {n}")
    attn = getattr(model_config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa",) and "flash" not in attn:
        raise UserError(f"train.sequence_parallel {n} cannot run on {attn!r} attention (Ulysses needs sdpa or "
                        "flash attention); set model.attn_implementation to sdpa or flash_attention_2")


def data_parallel_world(config, world_size: int) -> int:
    """The processes a run's batch splits over: world / `train.sequence_parallel`, after `check`
    (rank 0 and the --nproc launcher call this before any compute)."""
    n = config.train.sequence_parallel
    if n > 1:
        check(config, world_size, config.model_config())
    return world_size // n


# ------------------------------------------------------------------------------------------------
# Setup and teardown


def _document_attention(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
    """SDPA over the whole gathered sequence, masked per document from its position ids."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .documents import block_causal_mask

    if position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
        attention_mask = _cached_mask(position_ids, block_causal_mask)
    else:
        attention_mask = None  # one document per row: SDPA's causal path, no T×T mask
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


_MASK: list = []  # (position_ids, mask) of the last call: every layer of a forward shares them


def _cached_mask(position_ids, build):
    import torch

    if _MASK and _MASK[0][0].shape == position_ids.shape and torch.equal(_MASK[0][0], position_ids):
        return _MASK[0][1]
    mask = build(position_ids)
    _MASK[:] = [(position_ids, mask)]
    return mask


def _no_local_mask(*args, **kwargs):
    """The mask for the local slice: none, DeepSpeed's wrapper would drop it (see the module doc)."""
    return None


_ACTIVE: list = []  # (attention name, what ALL_ATTENTION_FUNCTIONS held there before), for teardown
_ACTIVE_MPU: list = []  # the mpu handed to DeepSpeed, which keeps it in deepspeed.utils.groups


def setup(model, config, d, micro_batch_size: int) -> SequenceParallel | None:
    """Register DeepSpeed's Ulysses attention for `model` and build the SP and SP×DP groups; None
    when `train.sequence_parallel` is 1. Call `teardown` when the run ends."""
    n = config.train.sequence_parallel
    if n == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    hf_config = model.config
    attn = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    if attn == "sdpa" or attn == ATTENTION:
        AttentionInterface.register(ATTENTION, _document_attention)
        AttentionMaskInterface.register(ATTENTION, _no_local_mask)
        attn = ATTENTION
        hf_config._attn_implementation = ATTENTION
    _ACTIVE.append((attn, ALL_ATTENTION_FUNCTIONS._local_mapping.get(attn)))
    # disable_in_eval: evaluation scores whole sequences per rank (training/evaluation.py shards
    # samples, not tokens), so eval calls go straight to the core attention.
    state = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=n,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True, disable_in_eval=True)
    # DeepSpeed's SP state module also answers the old Megatron "model parallel" questions with the
    # SP group, so checkpoints would record a tensor-parallel degree of N (and the universal
    # conversion would then look for N model files of one). The weights are not split: say so.
    mpu = types.SimpleNamespace(**{k: v for k, v in vars(state).items() if callable(v) and not k.startswith("_")},
                                get_tensor_model_parallel_world_size=lambda: 1,
                                get_tensor_model_parallel_rank=lambda: 0)
    _ACTIVE_MPU[:] = [mpu]
    return SequenceParallel(size=n, rank=state.get_sequence_parallel_rank(), dp_rank=d.rank // n,
                            dp_world=d.world // n, group=state.get_sequence_parallel_group(), mpu=mpu,
                            attention=attn)


def teardown() -> None:
    """Undo `setup` in this process: a later run (a test, a notebook) starts without SP groups."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    while _ACTIVE:
        name, before = _ACTIVE.pop()
        if before is None:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(name, None)
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping[name] = before
    _MASK.clear()
    parallel_state_sp._release_sequence_parallel_groups()
    if _ACTIVE_MPU and getattr(groups, "mpu", None) is _ACTIVE_MPU[0]:
        groups.mpu = None
    _ACTIVE_MPU.clear()
