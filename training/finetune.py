"""`pangu-pi finetune`: instruction-tune a checkpoint on chat data, fully or with LoRA, or on preference
pairs (DPO).

    pangu-pi finetune --config configs/yunshan_finetune_tiny.yaml --set model.init_from=runs/base/hf --out runs/sft
    pangu-pi finetune --config my_sft.yaml --nproc 2 --set finetune.mode=lora --set finetune.lora.r=16
    torchrun --nproc_per_node 8 -m pangu_pi.training.finetune --config my_sft.yaml --out runs/sft

The config is the run config every recipe shares (training/config.py, docs/training.md):
`model.init_from` is the HF checkpoint to start from (its `model.*` overrides, such as a longer
context or a RoPE scaling, reach the saved model), `data.datasets` the chat JSONL files (or folders,
globs) mixed by weight, `data.seq_len` the packed row length; what only fine-tuning has sits in
`finetune`: `mode` (full | lora | dpo), `lora.*`, `dpo.*`, `examples`, `epochs`. The flags are
pretraining's (training/command.py). `finetune.mode` picks the recipe from the table in
training/recipes/: chat SFT (recipes/sft.py) or preference tuning (recipes/dpo.py).
"""

from __future__ import annotations

import sys
from typing import Any

from . import command, recipes
from ._moved import moved_names
from .config import RunConfig, build_config


def build_finetune_config(values: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The shared loader, for the fine-tuning recipe (its defaults; the older layout loads with a note)."""
    return build_config(values, overrides, recipe="finetune")


def main(argv: list[str]) -> int:
    return command.main(argv, "finetune")


def finetune(config: RunConfig | dict, *, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Fine-tune on every rank of the current process group (or a group of one), with the recipe
    `finetune.mode` names. Returns rank 0's summary, also written to OUT/finetune_summary.json."""
    return recipes.run(config, "finetune", progress=progress, force=force)


# Names this module held before the recipes became a package.
__getattr__ = moved_names(__name__, {
    **dict.fromkeys(("Finetuning", "RowStream", "base_tokenizer", "load_data", "row_order", "split_rows",
                     "total_steps", "assistant_loss"), "pangu_pi.training.recipes.sft"),
    "recipe_for": "pangu_pi.training.recipes",
    "QuietExit": "pangu_pi.training.distributed",
})

if __name__ == "__main__":
    sys.exit(command.run_as_main("finetune"))
