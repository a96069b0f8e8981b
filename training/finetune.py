"""`pangu-pi finetune`: instruction-tune a checkpoint on chat data, fully or with LoRA.

    pangu-pi finetune --config configs/yunshan_finetune_tiny.yaml --set model.init_from=runs/base/hf --out runs/sft
    pangu-pi finetune --config my_sft.yaml --nproc 2 --set finetune.mode=lora --set finetune.lora.r=16
    torchrun --nproc_per_node 8 -m pangu_pi.training.finetune --config my_sft.yaml --out runs/sft

The config is the run config every recipe shares (training/config.py, docs/training.md):
`model.init_from` is the HF checkpoint to start from, `data.datasets` the chat JSONL files (or
folders, globs) mixed by weight, `data.seq_len` the packed row length, `batch.*`, `optim.*`,
`schedule.*`, `train.*`, `checkpoint.*`, `eval.*`, `log.*` as for pretraining; what only
fine-tuning has sits in `finetune`: `mode` (full | lora | dpo, the preference recipe of
training/dpo.py), `lora.{r, alpha, dropout, target_modules}`, `dpo.{beta, loss_type, ...}`,
`examples` (drawn into the mixture per epoch) and `epochs` (used when `train.max_steps` is null).
The flags are pretraining's: --config --out --max-steps --save-every --resume --nproc --set.

Chat records (`{"messages": [...]}`, the OpenAI shape) are rendered with the tokenizer's chat
template, labelled on the assistant's words only and packed into rows whose examples cannot see each
other (training/sft_data.py). Malformed records are counted per reason, printed at the start and
kept in the run's summary JSON.

This module is the fine-tuning recipe: the model (the checkpoint, wrapped by peft for LoRA), the
stream of packed rows (a seeded permutation per epoch, addressed by global sample index, so the
position is one number whatever the process count) and the assistant-only loss. The training core
(training/core.py) runs it, so fine-tuning has what pretraining has: mid-run checkpoints with the
data position and exact resume after a crash (`--resume auto`, also on another process count), the
non-finite guard, periodic evaluation (`eval.every`; held-out rows, `data.val_fraction` of them),
metrics.jsonl, TensorBoard, W&B and the loss plot.

`finetune.mode: full` ends with an HF checkpoint in OUT/model (tokenizer and generation config
included) that AutoModelForCausalLM and `pangu-pi serve` load. `finetune.mode: lora` ends with the
adapter in OUT/adapter (adapter_config.json + adapter_model.safetensors), the layout
`pangu-pi serve MODEL --lora NAME=OUT/adapter` (and vLLM's `--lora-modules`) loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from pangu_pi.errors import UserError

from . import core, launch
from .config import LORA_TARGETS, RunConfig, build_config, load_yaml, resolve_batch, run_folder  # noqa: F401
from .core import QuietExit

SUMMARY_FILE = "finetune_summary.json"
FinetuneConfig = RunConfig  # the fine-tuning run config is the shared one, read for this recipe


def build_finetune_config(values: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The shared loader, for the fine-tuning recipe (its defaults; the older layout loads with a note)."""
    return build_config(values, overrides, recipe="finetune")


# ------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    return core.run_parser("pangu-pi finetune", "Instruction-tune a checkpoint on chat JSONL.")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return core.run_config_from_args(args, recipe="finetune")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.nproc is not None and not launch.in_distributed_launch():
        # Every data, tokenizer and resume problem reported once, before any rank starts.
        recipe_for(config).plan(args.nproc, progress=False)
        return launch.spawn_local(args.nproc, [sys.executable, "-m", "pangu_pi.training.finetune", *launch.strip_nproc(argv)])
    try:
        finetune(config, progress=not args.no_progress)
    except QuietExit:
        return 2
    return 0


# ------------------------------------------------------------------------------------------------
# Data


def base_tokenizer(config: RunConfig):
    """The tokenizer a fine-tuning run renders its data with: data.tokenizer, else model.init_from's."""
    from pangu_pi.tokenizer import load_tokenizer

    from pangu_pi.folders import is_checkpoint

    base = config.model["init_from"]
    if not is_checkpoint(base):
        raise FileNotFoundError(
            f"model.init_from {base!r} is not an HF checkpoint (no config.json); "
            "export one with `pangu-pi export RUN OUT` and set model.init_from=OUT"
        )
    tok_dir = config.data.tokenizer or base
    tokenizer = load_tokenizer(tok_dir)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {tok_dir} has no chat template to render chats with")
    return tokenizer


def load_data(config: RunConfig, dataset=None):
    """(tokenizer, dataset) for the run: packed chat rows, or `dataset` (a class taking the same
    arguments, such as the preference recipe's pairs); user-fixable problems become UserError."""
    from .sft_data import PackedSFTDataset

    tokenizer = base_tokenizer(config)
    try:
        data = (dataset or PackedSFTDataset)(config.data.datasets, tokenizer, config.data.seq_len,
                                             total=config.finetune.examples, seed=config.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    return tokenizer, data


def row_order(n_rows: int, sample: int, seed: int) -> int:
    """The row that the run's `sample`-th draw reads: each epoch is a fresh seeded permutation, so
    every process computes the same order without talking to the others."""
    epoch, k = divmod(sample, n_rows)
    return _permutation(n_rows, seed, epoch)[k]


_PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 4:
            _PERMUTATIONS.clear()
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _PERMUTATIONS[key] = order
    return _PERMUTATIONS[key]


class RowStream:
    """The training rows in run order. Sample i of the run is row `rows[row_order(len(rows), i, seed)]`;
    the position (`samples_consumed`) counts the samples of all ranks together."""

    def __init__(self, data, rows: list[int], seed: int, attn_implementation: str, collate=None):
        self.data, self.rows, self.seed, self.attn = data, rows, seed, attn_implementation
        self.collate = collate  # items -> batch; None: packed chat rows (sft_data.collate)
        self.samples_consumed = 0

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1) -> dict:
        from .sft_data import collate

        first = self.samples_consumed + rank * n
        picked = [self.data[self.rows[row_order(len(self.rows), first + i, self.seed)]] for i in range(n)]
        self.samples_consumed += n * world_size
        return self.collate(picked) if self.collate is not None else collate(picked, self.attn)

    def state_dict(self) -> dict:
        return {"samples_consumed": int(self.samples_consumed), "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows", len(self.rows)) != len(self.rows):
            import warnings

            warnings.warn(f"resuming on {len(self.rows)} packed rows where the checkpoint had {state['rows']}: "
                          "the rows after the resume point differ from the original run's", stacklevel=2)
        self.samples_consumed = int(state["samples_consumed"])


def split_rows(n_rows: int, config: RunConfig) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): with evaluation on, `data.val_fraction` of the packed rows
    (at least one), drawn by a seeded shuffle, are kept out of training."""
    if not config.eval.every:
        return list(range(n_rows)), []
    order = list(range(n_rows))
    random.Random(config.seed * 7_919 + 1).shuffle(order)
    n_val = max(1, round(config.data.val_fraction * n_rows))
    return sorted(order[n_val:]), sorted(order[:n_val])


def total_steps(config: RunConfig, n_rows: int, global_batch: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(config.finetune.epochs * n_rows / global_batch))


def assistant_loss(logits, labels):
    """Mean next-token cross-entropy over the labelled (assistant) tokens; the rest are -100."""
    import torch.nn.functional as F

    from .sft_data import IGNORE_INDEX

    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


# ------------------------------------------------------------------------------------------------
# The model and what the run leaves behind


def _lora(config: RunConfig, model):
    from peft import LoraConfig, get_peft_model

    lora = config.finetune.lora
    return get_peft_model(model, LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    ))


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


def _save_full(config: RunConfig, state: dict, tokenizer, dest: Path) -> None:
    from transformers import GenerationConfig

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import stop_token_ids

    base = config.model["init_from"]
    model_config = PanGuPiConfig.from_pretrained(base)
    model_config.use_cache = True  # off while training; generation wants it
    model = PanGuPiForCausalLM.from_pretrained(None, config=model_config, state_dict=state)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    base_generation = Path(base) / "generation_config.json"
    if base_generation.is_file():
        shutil.copy2(base_generation, dest / "generation_config.json")
    else:
        # Stop at EOS and at the end of a chat turn: a tuned model ends its answer with <|im_end|>.
        GenerationConfig(bos_token_id=model_config.bos_token_id, eos_token_id=stop_token_ids(tokenizer),
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)


# ------------------------------------------------------------------------------------------------
# The recipe


class Finetuning(core.Recipe):
    name = "finetune"
    unit = "rows"  # what one sample of the data stream is
    load = staticmethod(load_data)  # config -> (tokenizer, dataset); the preference recipe reads pairs

    def __init__(self, config: RunConfig):
        self.config = config
        self._loaded = None

    def make_stream(self, rows: list[int]) -> RowStream:
        return RowStream(self.data, rows, self.config.seed, self.attn)

    def plan(self, world_size: int, progress: bool) -> dict:
        from .pretrain import check_resume

        split = check_resume(self.config, world_size)
        self._loaded = self.load(self.config)  # rank 0 vets the inputs first: one report if they are bad
        _, data = self._loaded
        train_rows, val_rows = split_rows(len(data), self.config)
        if val_rows and len(val_rows) < world_size:
            raise UserError(f"{len(val_rows)} held-out {self.unit} for {world_size} processes; raise data.val_fraction "
                            "or set eval.every=0")
        return {"split": split}

    def setup(self, plan: dict, d: core.Dist) -> None:
        # Every rank packs the same rows from the same seed (rank 0 already has them).
        self.tokenizer, self.data = self._loaded if self._loaded is not None else self.load(self.config)
        self._loaded = None
        self.split = plan["split"]
        train_rows, self.val_rows = split_rows(len(self.data), self.config)
        self.total_steps = total_steps(self.config, len(train_rows), self.split.global_batch_size)
        from pangu_pi import PanGuPiConfig

        self.model_config = PanGuPiConfig.from_pretrained(self.config.model["init_from"])
        self.attn = getattr(self.model_config, "_attn_implementation", None) or "sdpa"
        self.train_stream = self.make_stream(train_rows)
        self.trainable = None
        out = Path(self.config.out)
        self.tokenizer_dir = out / "tokenizer"
        if d.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(str(self.tokenizer_dir))  # saved with every checkpoint

    def build_model(self, ds_config: dict):
        model_config = self.config.model_config()
        model_config.use_cache = False
        model = core.build_model(model_config, ds_config, init_from=self.config.model["init_from"])
        model.config.use_cache = False
        self.attn = getattr(model.config, "_attn_implementation", None) or self.attn
        self.train_stream.attn = self.attn
        if self.config.finetune.uses_lora:
            model = _lora(self.config, model)
        if self.config.train.zero_stage != 3:
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def loss(self, engine, batch, d):
        batch = {k: v.to(d.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return assistant_loss(engine(**batch).logits, labels), int(batch["input_ids"].numel())

    def evaluate(self, engine, d) -> float:
        import torch
        import torch.nn.functional as F

        from .sft_data import IGNORE_INDEX, collate

        n = len(self.val_rows) // d.world * d.world
        mine = self.val_rows[d.rank:n:d.world]
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        micro = self.split.micro_batch_size
        engine.eval()
        with torch.no_grad():
            for i in range(0, len(mine), micro):
                batch = {k: v.to(d.device) for k, v in collate([self.data[j] for j in mine[i:i + micro]], self.attn).items()}
                labels = batch.pop("labels")
                logits = engine(**batch).logits
                targets = labels[:, 1:].reshape(-1)
                total[0] += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets,
                                            ignore_index=IGNORE_INDEX, reduction="sum")
                total[1] += int((targets != IGNORE_INDEX).sum())
        d.sum_(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def checkpoint_files(self) -> dict:
        return {"model/config.json": self.model_config.to_json_string(), "tokenizer": self.tokenizer_dir}

    def describe(self, d, n_params) -> str:
        c, split, data = self.config, self.split, self.data
        malformed = sum(data.stats["records"]["malformed"].values())
        return (f"malformed records: {malformed}\n{data.summary()}\n"
                f"fine-tuning ({c.finetune.mode}) for {self.total_steps} steps on {d.world} process(es), "
                f"batch {split.global_batch_size} rows × {c.data.seq_len} tokens"
                + (f", {self.trainable:,} trainable parameters" if self.trainable is not None else ""))

    def finish(self, engine, d, summary: dict) -> None:
        from .metrics import METRICS_FILE, read_metrics

        c, out, rank0 = self.config, Path(self.config.out), d.rank == 0
        summary.update({
            "mode": c.finetune.mode,
            "records": self.data.stats["records"],
            "data": {k: v for k, v in self.data.stats.items() if k != "records"},
            "steps": self.total_steps,
            "processes": d.world,
            "batch": dataclasses.asdict(self.split),
            "trainable_parameters": self.trainable,
        })
        if c.finetune.uses_lora:
            dest = out / "adapter"
            if rank0:
                engine.module.save_pretrained(str(dest), safe_serialization=True)
                self.tokenizer.save_pretrained(str(dest))
            summary["adapter"] = str(dest)
        else:
            dest = out / "model"
            state = _full_state_dict(engine, c.train.zero_stage, rank0)
            if rank0:
                _save_full(c, state, self.tokenizer, dest)
            summary["model"] = str(dest)
        if rank0:
            # From the metrics file: the whole run's history, also when this process resumed it.
            losses = [r["loss"] for r in read_metrics(out / METRICS_FILE) if "loss" in r]
            if losses:
                summary.update(first_loss=losses[0], final_loss=losses[-1])
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            if losses:
                print(f"loss {losses[0]:.4f} → {losses[-1]:.4f}; wrote {dest}", flush=True)


def recipe_for(config: RunConfig) -> Finetuning:
    """The fine-tuning recipe `finetune.mode` names: chat SFT (full, lora) or preference tuning (dpo)."""
    if config.finetune.mode == "dpo":
        from .dpo import PreferenceTuning

        return PreferenceTuning(config)
    return Finetuning(config)


def finetune(config: RunConfig | dict, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune on every rank of the current process group (or a group of one). Returns rank 0's
    summary, also written to OUT/finetune_summary.json."""
    if isinstance(config, dict):
        config = build_finetune_config(config)
    return core.train(recipe_for(config), progress=progress)


if __name__ == "__main__":
    from pangu_pi import cli

    sys.exit(cli.main(["finetune", *sys.argv[1:]]))
