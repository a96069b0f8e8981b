"""The DeepSpeed side of a run, built from the run config: the DeepSpeed config, AdamW's parameter
groups, and the model (partitioned from the start under ZeRO-3).

Kept apart from the loop (training/core.py) so DeepSpeed-free planning tools, such as the memory
estimate (training/memory.py), read the exact config the trainer would build.
"""

from __future__ import annotations

from typing import Any

from pangu_pi.overrides import deep_merge

from .config import BatchSplit, RunConfig


def deepspeed_config(config: RunConfig, split: BatchSplit, on_gpu: bool) -> dict:
    t, o = config.train, config.optim
    zero: dict[str, Any] = {"stage": t.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    optimizer_params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                        "weight_decay": o.weight_decay}
    if not (on_gpu and t.offload_optimizer) and o.implementation == "torch":
        # torch's AdamW: nothing to compile at start-up (DeepSpeed's own Adam ops build with a C++
        # compiler on first use); on a GPU its fused kernel is as fast as DeepSpeed's (optim.implementation:
        # deepspeed takes DeepSpeed's FusedAdam instead; which is faster is to be measured). Fused on CPU
        # too: the unfused update allocates two temporaries the size of the whole flat partition
        # (sqrt(v) and its quotient), 8 bytes a partitioned parameter at the step's peak.
        optimizer_params["torch_adam"] = True
        optimizer_params["fused"] = True
    ds = {
        "train_batch_size": split.global_batch_size,
        "train_micro_batch_size_per_gpu": split.micro_batch_size,
        "gradient_accumulation_steps": split.grad_accum,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # we report progress ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, config.deepspeed)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the projection and embedding matrices; not norms, not SIAF coefficients
    (they shape an activation function, and pulling them to zero would flatten it)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (keep if len(shape) < 2 or "norm" in name or ".siaf." in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]] or groups[:1]


def build_model(model_config, ds_config: dict, init_from: str | None = None):
    """The model, built already partitioned under ZeRO-3 so no process ever holds all of it; with
    `init_from`, holding that HF checkpoint's weights (loaded into the partitions under ZeRO-3)."""
    import torch

    from pangu_pi import PanGuPiForCausalLM

    def make():
        if init_from:
            # fp32 whatever the checkpoint's dtype: DeepSpeed casts for bf16 and keeps fp32 masters.
            return PanGuPiForCausalLM.from_pretrained(init_from, config=model_config, dtype=torch.float32)
        return PanGuPiForCausalLM._from_config(model_config) if zero3 else PanGuPiForCausalLM(model_config)

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds models inside deepspeed.zero.Init and
        # initialises (or loads) each partitioned weight on gathered copies.
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841
        model = make()
        model._hf_ds_config = keep
        return model
    return make()
