"""`pangu-pi finetune`: instruction-tune a checkpoint on chat data, fully or with LoRA.

    pangu-pi finetune --config configs/finetune_tiny.yaml --set model=runs/base/hf --out runs/sft
    pangu-pi finetune --config my_sft.yaml --nproc 2 --set mode=lora --set lora.r=16

Chat JSONL records (`{"messages": [...]}`, the OpenAI shape) from one or more datasets, mixed by
weight, are rendered with the tokenizer's chat template, labelled on the assistant's words only and
packed into rows whose examples cannot see each other (training/sft_data.py). Malformed records are
counted per reason, printed at the start and kept in the run's summary JSON.

Both modes run through DeepSpeed, so data parallelism, ZeRO and the launchers are those of
`pangu-pi pretrain`. `mode: full` trains every weight and ends with an HF checkpoint in OUT/model
(tokenizer and generation config included) that AutoModelForCausalLM and `pangu-pi serve` load.
`mode: lora` wraps the model with peft and trains only the adapter, saved in OUT/adapter as
adapter_config.json + adapter_model.safetensors: the layout `pangu-pi serve MODEL --lora NAME=OUT/adapter`
(and vLLM's `--lora-modules`) loads.

The config file, every key optional except `model` and `datasets` (defaults in brackets):

    model: DIR                   HF checkpoint to start from (its tokenizer, unless `tokenizer` is set)
    tokenizer: DIR               [null: the model's folder]
    out: DIR                     run folder [runs/<config name>]
    seed: 0
    datasets: [{path: chat.jsonl, weight: 1.0}, ...]   files, folders or globs; weights set the mixture
    examples: N                  examples drawn into the mixture per epoch [null: as many as there are]
    seq_len: 512                 tokens per packed row; longer records are counted as `too_long`
    epochs: 1.0                  passes over the packed rows (ignored when max_steps is set)
    max_steps: N                 optimizer steps [null: from epochs]
    batch: {global_batch_size, micro_batch_size, grad_accum}   in rows; as for pretraining
    optim: {lr: 2e-5, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.0, grad_clip: 1.0}
    schedule: {kind: cosine, warmup_steps: 10, min_lr_ratio: 0.1, decay_fraction: 0.1}
    mode: full | lora            [full]
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
    precision: fp32 | bf16       [fp32]
    zero_stage: 1 | 2 | 3        [2; LoRA takes 1 or 2]
    log: {every: 1, tensorboard: true, plot: true}
    deepspeed: {...}             passed through over the derived DeepSpeed config

A fine-tuning run is short, so it does not checkpoint mid-way; it writes its result at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pangu_pi.cli import UserError
from pangu_pi.config import ConfigError

from . import launch
from .config import BatchConfig, OptimConfig, _coerce, _deep_merge, load_yaml, parse_override, resolve_batch, run_folder

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUMMARY_FILE = "finetune_summary.json"


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class FinetuneSchedule:
    kind: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1


@dataclass
class FinetuneLog:
    every: int = 1
    tensorboard: bool = True
    plot: bool = True


def _finetune_optim() -> OptimConfig:
    # Instruction tuning moves a trained model a little: a lower peak and no pull towards zero.
    return OptimConfig(lr=2e-5, weight_decay=0.0)


@dataclass
class FinetuneConfig:
    model: str | None = None
    tokenizer: str | None = None
    out: str | None = None
    seed: int = 0
    datasets: list = field(default_factory=list)
    examples: int | None = None
    seq_len: int = 512
    epochs: float = 1.0
    max_steps: int | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    schedule: FinetuneSchedule = field(default_factory=FinetuneSchedule)
    mode: str = "full"
    lora: LoraSection = field(default_factory=LoraSection)
    precision: str = "fp32"
    zero_stage: int = 2
    log: FinetuneLog = field(default_factory=FinetuneLog)
    deepspeed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Reading the config: the pretraining reader's value coercion, with this config's own key list.


def _key_paths(cls=FinetuneConfig, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        paths.append(prefix + f.name)
        sub = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            paths += _key_paths(sub, prefix + f.name + ".")
    return paths


def _unknown_key(path: str) -> ConfigError:
    candidates = _key_paths()
    leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
    leaf = path.rsplit(".", 1)[-1]
    close = [leaves[leaf]] if leaf in leaves and leaves[leaf] != path else []
    close = close or difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not close:
        match = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        close = [leaves[match[0]]] if match else []
    hint = f"; did you mean {close[0]!r}?" if close else "; the keys are listed in training/finetune.py and docs/training.md"
    return ConfigError(f"unknown config key {path!r}{hint}")


def _build(cls, values: Any, prefix: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(prefix + str(key))
        tp = hints[key]
        kwargs[key] = _build(tp, value, f"{prefix}{key}.") if dataclasses.is_dataclass(tp) else _coerce(prefix + key, value, tp)
    return cls(**kwargs)


def build_finetune_config(values: dict | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    values = dict(values or {})
    for item in overrides or []:
        values = _deep_merge(values, parse_override(item))
    config = _build(FinetuneConfig, values)
    check(config)
    return config


def check(c: FinetuneConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(bool(c.model), "set `model` to the HF checkpoint folder to fine-tune (e.g. the output of `pangu-pi export`)")
    need(bool(c.datasets), "set `datasets` to a list of {path: chat.jsonl, weight: 1.0}")
    for i, entry in enumerate(c.datasets):
        if isinstance(entry, str):
            continue
        need(
            isinstance(entry, dict) and "path" in entry and set(entry) <= {"path", "weight"},
            f"datasets[{i}] must be {{path: FILE, weight: NUMBER}}, got {entry!r}",
        )
        w = entry.get("weight", 1.0)
        need(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and math.isfinite(w),
             f"datasets[{i}].weight must be a positive number, got {w!r}")
    need(c.seq_len >= 8, f"seq_len must be at least 8, got {c.seq_len}")
    need(c.examples is None or c.examples >= 1, f"examples must be at least 1 or null, got {c.examples}")
    need(c.epochs > 0, f"epochs must be positive, got {c.epochs}")
    need(c.max_steps is None or c.max_steps >= 1, f"max_steps must be at least 1 or null, got {c.max_steps}")
    need(c.optim.lr > 0, f"optim.lr must be positive, got {c.optim.lr}")
    need(c.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {c.optim.grad_clip}")
    need(c.schedule.kind in ("cosine", "wsd", "constant"),
         f"schedule.kind must be cosine, wsd or constant, got {c.schedule.kind!r}")
    need(c.schedule.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {c.schedule.warmup_steps}")
    need(c.mode in ("full", "lora"), f"mode must be full or lora, got {c.mode!r}")
    need(c.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {c.precision!r}")
    need(c.zero_stage in (1, 2, 3), f"zero_stage must be 1, 2 or 3, got {c.zero_stage}")
    need(c.log.every >= 1, f"log.every must be at least 1, got {c.log.every}")
    if c.mode == "lora":
        need(c.zero_stage in (1, 2), "LoRA trains a few million weights at most: use zero_stage 1 or 2, not 3")
        need(c.lora.r >= 1, f"lora.r must be at least 1, got {c.lora.r}")
        need(0 <= c.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {c.lora.dropout}")
        need(bool(c.lora.target_modules), "lora.target_modules is empty; name some of " + ", ".join(LORA_TARGETS))
        for name in c.lora.target_modules:
            close = difflib.get_close_matches(str(name), LORA_TARGETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            need(name in LORA_TARGETS,
                 f"lora.target_modules: {name!r} is not a projection vLLM serves LoRA on{hint} "
                 f"(choose among {', '.join(LORA_TARGETS)})")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        need(key not in c.deepspeed, f"deepspeed.{key} would fight the batch section; set batch.* instead")


# ------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pangu-pi finetune", description="Instruction-tune a checkpoint on chat JSONL.")
    p.add_argument("--config", required=True, help="fine-tuning config YAML (keys: training/finetune.py)")
    p.add_argument("--out", help="run folder (default: the config's `out`, else runs/CONFIG_NAME)")
    p.add_argument("--nproc", type=int, help="spawn N local processes (CPU or one node) instead of using a launcher")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. optim.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    config = build_finetune_config(load_yaml(args.config), list(args.set))
    config.out = run_folder(args.config, args.out, config.out)
    return config


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.nproc is not None and not launch.in_distributed_launch():
        load_data(config)  # every data and tokenizer problem reported once, before any rank starts
        return launch.spawn_local(args.nproc, [sys.executable, "-m", "training.finetune", *launch.strip_nproc(argv)])
    from .pretrain import QuietExit

    try:
        finetune(config, progress=not args.no_progress)
    except QuietExit:
        return 2
    return 0


# ------------------------------------------------------------------------------------------------
# Data


def load_data(config: FinetuneConfig):
    """(tokenizer, packed dataset) for the run; user-fixable problems become UserError."""
    from pangu_pi.tokenizer import load_tokenizer

    from .sft_data import PackedSFTDataset

    if not (Path(config.model) / "config.json").is_file():
        raise FileNotFoundError(
            f"model {config.model!r} is not an HF checkpoint (no config.json); "
            "export one with `pangu-pi export RUN OUT` and set `model: OUT`"
        )
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {config.tokenizer or config.model} has no chat template to render chats with")
    try:
        data = PackedSFTDataset(config.datasets, tokenizer, config.seq_len, total=config.examples, seed=config.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    return tokenizer, data


def row_order(n_rows: int, sample: int, seed: int) -> int:
    """The row that the run's `sample`-th draw reads: each epoch is a fresh seeded permutation, so
    every process computes the same order without talking to the others."""
    epoch, k = divmod(sample, n_rows)
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k]


def total_steps(config: FinetuneConfig, n_rows: int, global_batch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_rows / global_batch))


def assistant_loss(logits, labels):
    """Mean next-token cross-entropy over the labelled (assistant) tokens; the rest are -100."""
    import torch.nn.functional as F

    from .sft_data import IGNORE_INDEX

    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


# ------------------------------------------------------------------------------------------------
# The model


def load_model(config: FinetuneConfig, ds_config: dict):
    import torch

    from pangu_pi import PanGuPiForCausalLM

    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    if config.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, from_pretrained loads each weight straight into its ZeRO-3 partition.
        keep = HfDeepSpeedConfig(ds_config)
        model = PanGuPiForCausalLM.from_pretrained(config.model, dtype=dtype)
        model._hf_ds_config = keep
    else:
        model = PanGuPiForCausalLM.from_pretrained(config.model, dtype=dtype)
    model.config.use_cache = False
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=list(config.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def _full_state_dict(engine, zero_stage: int, rank0: bool) -> dict | None:
    """The whole model's weights on rank 0 (gathered from the partitions under ZeRO-3)."""
    module = engine.module
    if zero_stage != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank0 else None
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank0:
                state[name] = param.detach().cpu().clone()
    if rank0:
        for name, buf in module.named_buffers():
            state[name] = buf.detach().cpu().clone()
    return state if rank0 else None


def _save_full(config: FinetuneConfig, state: dict, tokenizer, dest: Path) -> None:
    from transformers import GenerationConfig

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import EOS, IM_END

    model_config = PanGuPiConfig.from_pretrained(config.model)
    model_config.use_cache = True  # off while training; generation wants it
    model = PanGuPiForCausalLM.from_pretrained(None, config=model_config, state_dict=state)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    base_generation = Path(config.model) / "generation_config.json"
    if base_generation.is_file():
        shutil.copy2(base_generation, dest / "generation_config.json")
    else:
        # Stop at EOS and at the end of a chat turn: a tuned model ends its answer with <|im_end|>.
        eos = [i for i in (tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)) if i is not None]
        GenerationConfig(bos_token_id=model_config.bos_token_id, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)


def _deepspeed_config(config: FinetuneConfig, split, on_gpu: bool) -> dict:
    from .pretrain import deepspeed_config

    view = SimpleNamespace(
        train=SimpleNamespace(zero_stage=config.zero_stage, offload_optimizer=False, precision=config.precision),
        optim=config.optim,
        deepspeed=config.deepspeed,
    )
    return deepspeed_config(view, split, on_gpu)


# ------------------------------------------------------------------------------------------------
# The run


def finetune(config: FinetuneConfig | dict, *, progress: bool = True) -> dict:
    """Fine-tune on every rank of the current process group (or a group of one). Returns rank 0's
    summary, also written to OUT/finetune_summary.json."""
    if isinstance(config, dict):
        config = build_finetune_config(config)
    if not config.out:
        raise ConfigError("set `out` (the run folder) in the config or pass --out")
    from .pretrain import _quiet_libraries, init_distributed

    _quiet_libraries()
    d = init_distributed()
    try:
        loaded: dict = {}
        # Rank 0 vets the inputs first (one report if they are bad); then every rank packs the
        # same rows from the same seed.
        d.share_from_rank0(lambda: loaded.setdefault("data", load_data(config)) and None)
        tokenizer, data = loaded["data"] if d.rank == 0 else load_data(config)
        return _run(config, tokenizer, data, d, progress)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run(config: FinetuneConfig, tokenizer, data, d, progress: bool) -> dict:
    import deepspeed
    import numpy as np
    import torch

    from .metrics import PLOT_FILE, RunLogger
    from .pretrain import param_groups
    from .schedule import lr_scheduler, make_schedule
    from .sft_data import collate

    rank0 = d.rank == 0
    out = Path(config.out)
    split = resolve_batch(config.batch, d.world)
    on_gpu = d.device.type == "cuda"
    ds_config = _deepspeed_config(config, split, on_gpu)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    n_rows = len(data)
    steps = total_steps(config, n_rows, split.global_batch_size)
    model = load_model(config, ds_config)
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    schedule = make_schedule(config.schedule, steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, config.optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, schedule),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if config.zero_stage != 3 else None

    summary: dict[str, Any] = {
        "out": str(out),
        "mode": config.mode,
        "records": data.stats["records"],
        "data": {k: v for k, v in data.stats.items() if k != "records"},
        "steps": steps,
        "processes": d.world,
        "batch": dataclasses.asdict(split),
        "trainable_parameters": trainable,
    }
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_yaml(config.to_dict()))
    logger = RunLogger(out, enabled=rank0, start_step=0, max_steps=steps, tensorboard=config.log.tensorboard,
                       progress=progress)
    if getattr(logger, "_bar", None) is not None:
        logger._bar.set_description("finetune")
    malformed = sum(data.stats["records"]["malformed"].values())
    logger.message(f"malformed records: {malformed}\n{data.summary()}")
    logger.message(f"fine-tuning ({config.mode}) for {steps} steps on {d.world} process(es), "
                   f"batch {split.global_batch_size} rows × {config.seq_len} tokens"
                   + (f", {trainable:,} trainable parameters" if trainable is not None else ""))

    losses: list[float] = []
    engine.train()
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            micro_losses, tokens = [], 0
            for a in range(split.grad_accum):
                first = ((step - 1) * split.grad_accum + a) * split.global_batch_size // split.grad_accum
                first += d.rank * split.micro_batch_size
                rows = [data[row_order(n_rows, first + i, config.seed)] for i in range(split.micro_batch_size)]
                batch = {k: v.to(d.device) for k, v in collate(rows, attn).items()}
                labels = batch.pop("labels")
                logits = engine(**batch).logits
                loss = assistant_loss(logits, labels)
                engine.backward(loss)
                engine.step()
                micro_losses.append(loss.detach())
                tokens += int(batch["input_ids"].numel())
            step_loss = d.mean(torch.stack(micro_losses).mean().item())
            losses.append(step_loss)
            norm = engine.get_global_grad_norm()
            elapsed = time.perf_counter() - t0
            row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(norm) if norm is not None else None,
                   "tokens_per_s": tokens * d.world / elapsed, "skipped": not engine.was_step_applied()}
            logger.step(row, write=step % config.log.every == 0 or step == steps)
            if not math.isfinite(step_loss):
                raise UserError(f"step {step}: the loss is {step_loss}; lower optim.lr or raise schedule.warmup_steps")

        summary.update(first_loss=losses[0], final_loss=losses[-1])
        engine.eval()
        if config.mode == "lora":
            dest = out / "adapter"
            if rank0:
                engine.module.save_pretrained(str(dest), safe_serialization=True)
                tokenizer.save_pretrained(str(dest))
            summary["adapter"] = str(dest)
        else:
            dest = out / "model"
            state = _full_state_dict(engine, config.zero_stage, rank0)
            if rank0:
                _save_full(config, state, tokenizer, dest)
            summary["model"] = str(dest)
        if rank0:
            if config.log.plot:
                logger.plot(out / PLOT_FILE)
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            logger.message(f"loss {losses[0]:.4f} → {losses[-1]:.4f}; wrote {dest}")
        d.barrier()
    finally:
        logger.close()
    return summary


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


if __name__ == "__main__":
    from pangu_pi import cli

    sys.exit(cli.main(["finetune", *sys.argv[1:]]))
