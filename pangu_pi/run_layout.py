"""Where a training run keeps what it writes: the run folder and the checkpoints in it.

Every writer and reader of these files names them from here: the trainer (pangu_pi.training.core,
.checkpoint, .recipes), the exporter, the model card. It sits in the model library's layer because
the model card, which describes a checkpoint from its run, may import nothing above it.

    OUT/                           the run folder (`--out`)
        .pangu-pi-run.json         which command made the folder, and the run's id
        .pangu-pi-run.lock         held (flock) by the one run using the folder
        config.yaml                the resolved run config
        metrics.jsonl, loss_curves.png, tensorboard/, wandb/, wandb_id
        tokenizer/                 fine-tuning: the tokenizer the chats were rendered with
        dpo_reference.pt           preference tuning: the starting model's log-probabilities
        model/ | adapter/          fine-tuning's result: an HF checkpoint, or a LoRA adapter
        finetune_summary.json
        checkpoints/
            latest                 the name of the newest complete checkpoint
            step_N/                one complete checkpoint (see CHECKPOINT_FILES)
            step_N.tmp/            a save in progress
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# ---- the run folder -------------------------------------------------------------------------------
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss_curves.png"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
WANDB_ID = "wandb_id"
TOKENIZER = "tokenizer"
FINAL_MODEL = "model"
ADAPTER = "adapter"
FINETUNE_SUMMARY = "finetune_summary.json"
DPO_REFERENCE = "dpo_reference.pt"
RUN_MARKER = ".pangu-pi-run.json"
RUN_LOCK = ".pangu-pi-run.lock"

# What a training run writes at the top of its folder (`--force` removes these and nothing else),
# as glob patterns; their temporary siblings included.
RUN_OUTPUTS = (CHECKPOINTS, RUN_CONFIG, METRICS, "metrics.jsonl.tmp", LOSS_PLOT, "loss_curves.tmp.png",
               TENSORBOARD, WANDB, WANDB_ID, TOKENIZER, FINAL_MODEL, ADAPTER, FINETUNE_SUMMARY, DPO_REFERENCE,
               DPO_REFERENCE + ".tmp")
# Made by pretraining on the embedded corpus when `data.cache_dir` is unset: reused by later runs,
# never removed by `--force`.
RUN_CACHES = ("tokenizer-default-*", "data")

# ---- one checkpoint (OUT/checkpoints/step_N) ------------------------------------------------------
COMPLETE = "COMPLETE"  # written last: a folder without it is not a checkpoint
LATEST = "latest"
TMP_SUFFIX = ".tmp"
ENGINE = "engine"  # DeepSpeed's tag: model, optimizer and scheduler state, per rank
UNIVERSAL = "universal"  # the engine state as DeepSpeed's universal checkpoint, made on demand
MODEL_CONFIG = "model/config.json"  # what `pangu-pi export` builds the model from
TRAINER_STATE = "trainer/state.json"  # step, samples and tokens consumed, process count, run id
CONSOLIDATION_SCRIPT = "zero_to_fp32.py"
CHECKPOINT_FILES = (ENGINE, CONSOLIDATION_SCRIPT, "trainer/rank_R.pt", TRAINER_STATE, RUN_CONFIG, MODEL_CONFIG,
                    TOKENIZER, COMPLETE)
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def step_of(checkpoint: str | os.PathLike) -> int | None:
    """N of a `step_N` folder; None for any other name."""
    match = STEP_DIR.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def rank_state(rank: int) -> str:
    """A rank's own file in a checkpoint: its data position and RNG states."""
    return f"trainer/rank_{rank}.pt"


def run_of(checkpoint: str | os.PathLike) -> Path:
    """The run folder a checkpoint (OUT/checkpoints/step_N) belongs to."""
    return Path(checkpoint).parent.parent
