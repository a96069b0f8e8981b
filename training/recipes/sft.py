"""The chat fine-tuning recipe (`pangu-pi finetune`, `finetune.mode: full | lora`): the model (the
checkpoint in `model.init_from`, with the run's `model.*` overrides, wrapped by peft for LoRA), the
stream of packed chat rows (a seeded permutation per epoch, addressed by global sample index, so the
position is one number whatever the process count) and the assistant-only loss.

Chat records (`{"messages": [...]}`, the OpenAI shape) are rendered with the tokenizer's chat
template, labelled on the assistant's words only and packed into rows whose examples cannot see each
other (training/sft_data.py). Malformed records are counted per reason, printed at the start and
kept in the run's summary JSON.

`full` ends with an HF checkpoint in OUT/model (tokenizer and generation config included) that
AutoModelForCausalLM and `pangu-pi serve` load; `lora` with the adapter in OUT/adapter
(adapter_config.json + adapter_model.safetensors), the layout `pangu-pi serve MODEL --lora
NAME=OUT/adapter` (and vLLM's `--lora-modules`) loads. The preference recipe (recipes/dpo.py)
builds on this one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

from pangu_pi import run_layout as layout
from pangu_pi.errors import UserError

from ..checkpoint import check_resume, consolidated_state_dict
from ..config import RunConfig
from ..core import Recipe
from ..engine import build_model
from ..evaluation import sharded_sums, token_loss_sums


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
    from ..sft_data import PackedSFTDataset

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
        from ..sft_data import collate

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


def _rows_without_mask(items) -> dict:
    import torch

    return {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "labels", "position_ids")}


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

    from ..sft_data import IGNORE_INDEX

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


# ------------------------------------------------------------------------------------------------
# The recipe


class Finetuning(Recipe):
    name = "finetune"
    unit = "rows"  # what one sample of the data stream is
    load = staticmethod(load_data)  # config -> (tokenizer, dataset); the preference recipe reads pairs

    def __init__(self, config: RunConfig):
        self.config = config
        self._loaded = None

    def make_stream(self, rows: list[int]) -> RowStream:
        if self.config.train.sequence_parallel > 1:
            # No (T, T) block mask per row: under sequence parallelism attention rebuilds the whole
            # sequence's from the gathered position ids (training/sequence_parallel.py).
            return RowStream(self.data, rows, self.config.seed, self.attn, collate=_rows_without_mask)
        return RowStream(self.data, rows, self.config.seed, self.attn)

    def plan(self, world_size: int, progress: bool) -> dict:
        split = check_resume(self.config, world_size)
        self._loaded = self.load(self.config)  # rank 0 vets the inputs first: one report if they are bad
        _, data = self._loaded
        train_rows, val_rows = split_rows(len(data), self.config)
        if val_rows and len(val_rows) < world_size:
            raise UserError(f"{len(val_rows)} held-out {self.unit} for {world_size} processes; raise data.val_fraction "
                            "or set eval.every=0")
        return {"split": split}

    def setup(self, plan: dict, d) -> None:
        # Every rank packs the same rows from the same seed (rank 0 already has them).
        self.tokenizer, self.data = self._loaded if self._loaded is not None else self.load(self.config)
        self._loaded = None
        self.split = plan["split"]
        train_rows, self.val_rows = split_rows(len(self.data), self.config)
        self.total_steps = total_steps(self.config, len(train_rows), self.split.global_batch_size)
        # The run's model config: the base checkpoint's with the run's `model.*` overrides (a longer
        # context, a RoPE scaling), which is what the model is built from and what every checkpoint
        # and the final model record.
        self.model_config = self.config.model_config()
        self.model_config.use_cache = False
        self.attn = getattr(self.model_config, "_attn_implementation", None) or "sdpa"
        self.train_stream = self.make_stream(train_rows)
        self.trainable = None
        out = Path(self.config.out)
        self.tokenizer_dir = out / layout.TOKENIZER
        if d.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(str(self.tokenizer_dir))  # saved with every checkpoint

    def build_model(self, ds_config: dict):
        model = build_model(copy.deepcopy(self.model_config), ds_config, init_from=self.config.model["init_from"])
        model.config.use_cache = False
        self.attn = getattr(model.config, "_attn_implementation", None) or self.attn
        self.train_stream.attn = self.attn
        if self.config.finetune.uses_lora:
            model = _lora(self.config, model)
        if self.config.train.zero_stage != 3:
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def loss(self, engine, batch, d):
        batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
        if self.sequence_parallel:
            # Shifted before the split (a slice's last target is the next slice's first token); the
            # block mask is rebuilt from the gathered position ids (training/sequence_parallel.py).
            import torch.nn.functional as F

            from ..sft_data import IGNORE_INDEX

            shift = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
            return self.sequence_parallel.causal_lm_loss(engine, batch["input_ids"], shift, batch["position_ids"],
                                                         ignore_index=IGNORE_INDEX)
        # The model computes assistant_loss's value from the labels (train.fused_loss: without
        # forming the logits); it shifts them itself.
        return engine(**batch).loss, int(batch["input_ids"].numel())

    def evaluate(self, engine, d) -> float:
        from ..sft_data import IGNORE_INDEX, collate

        def score(engine, rows):
            batch = {k: v.to(d.device) for k, v in collate([self.data[j] for j in rows], self.attn).items()}
            labels = batch.pop("labels")
            return token_loss_sums(engine(**batch).logits, labels, IGNORE_INDEX)

        total = sharded_sums(engine, d, self.val_rows, self.split.micro_batch_size, score, width=2)
        return (total[0] / total[1].clamp(min=1)).item()

    def checkpoint_files(self) -> dict:
        return {layout.MODEL_CONFIG: self.model_config.to_json_string(), layout.TOKENIZER: self.tokenizer_dir}

    def describe(self, d, n_params) -> str:
        c, split, data = self.config, self.split, self.data
        malformed = sum(data.stats["records"]["malformed"].values())
        return (f"malformed records: {malformed}\n{data.summary()}\n"
                f"fine-tuning ({c.finetune.mode}) for {self.total_steps} steps on {d.world} process(es), "
                f"batch {split.global_batch_size} rows × {c.data.seq_len} tokens"
                + (f", {self.trainable:,} trainable parameters" if self.trainable is not None else ""))

    def save_model(self, checkpoint: Path, dest: Path) -> None:
        """The fine-tuned model as an HF checkpoint in `dest` (rank 0): the weights of the run's last
        checkpoint, gathered from their ZeRO partitions by the same code as `pangu-pi export`, under
        the run's model config, in the training precision; the tokenizer; a generation config."""
        import torch

        from pangu_pi import PanGuPiForCausalLM
        from pangu_pi.tokenizer import generation_config

        model_config = copy.deepcopy(self.model_config)
        model_config.use_cache = True  # off while training; generation wants it
        with torch.device("meta"):
            expected = set(PanGuPiForCausalLM(model_config).state_dict())
        dtype = torch.bfloat16 if self.config.train.precision == "bf16" else torch.float32
        state = {k: v.to(dtype) for k, v in consolidated_state_dict(checkpoint, expected).items()}
        model = PanGuPiForCausalLM.from_pretrained(None, config=model_config, state_dict=state, dtype=dtype)
        model.save_pretrained(dest, safe_serialization=True)
        self.tokenizer.save_pretrained(dest)
        base_generation = Path(self.config.model["init_from"]) / "generation_config.json"
        if base_generation.is_file():
            shutil.copy2(base_generation, dest / "generation_config.json")
        else:
            # Stop at EOS and at the end of a chat turn: a tuned model ends its answer with <|im_end|>.
            generation_config(self.tokenizer, bos_token_id=model_config.bos_token_id).save_pretrained(dest)

    def finish(self, engine, d, summary: dict) -> None:
        from ..metrics import read_metrics

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
            dest = out / layout.ADAPTER
            if rank0:
                engine.module.save_pretrained(str(dest), safe_serialization=True)
                self.tokenizer.save_pretrained(str(dest))
            summary["adapter"] = str(dest)
        else:
            dest = out / layout.FINAL_MODEL
            if rank0:
                self.save_model(Path(summary["checkpoint"]), dest)
            summary["model"] = str(dest)
        if rank0:
            # From the metrics file: the whole run's history, also when this process resumed it.
            losses = [r["loss"] for r in read_metrics(out / layout.METRICS) if "loss" in r]
            if losses:
                summary.update(first_loss=losses[0], final_loss=losses[-1])
            (out / layout.FINETUNE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
            if losses:
                print(f"loss {losses[0]:.4f} → {losses[-1]:.4f}; wrote {dest}", flush=True)
