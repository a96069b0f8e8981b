"""The training recipes, each one module, chosen from one table by the command and `finetune.mode`.

    recipe (key)        module          command
    pretrain            pretrain.py     pangu-pi pretrain (also continued pretraining: model.init_from)
    full, lora          sft.py          pangu-pi finetune, finetune.mode: full | lora (chat SFT)
    dpo                 dpo.py          pangu-pi finetune, finetune.mode: dpo (builds on sft.py)
    grpo                grpo.py         pangu-pi finetune, finetune.mode: grpo (builds on sft.py)

A recipe imports the core (training/core.py) and, at most, a recipe it builds on: dpo and grpo
import sft, never the reverse, and this table is the only place that knows them all.
"""

from __future__ import annotations

from ..config import RunConfig, build_config
from ..core import Recipe, train
from .dpo import PreferenceTuning
from .grpo import GroupRelativeTuning
from .pretrain import Pretraining
from .sft import Finetuning

RECIPES: dict[str, type[Recipe]] = {
    "pretrain": Pretraining,
    "full": Finetuning,
    "lora": Finetuning,
    "dpo": PreferenceTuning,
    "grpo": GroupRelativeTuning,
}


def recipe_for(config: RunConfig) -> Recipe:
    """The recipe a run config names: `pretrain` for `pangu-pi pretrain`, else `finetune.mode`."""
    return RECIPES["pretrain" if config.recipe == "pretrain" else config.finetune.mode](config)


def run(config: RunConfig | dict, recipe: str, *, progress: bool = True, force: bool = False, callbacks=()) -> dict:
    """Train `config` (a RunConfig, or a dict as read from YAML) with the recipe it names, on every
    rank of the current process group (or a group of one). Returns rank 0's summary."""
    if isinstance(config, dict):
        config = build_config(config, recipe=recipe)
    return train(recipe_for(config), progress=progress, force=force, callbacks=callbacks)
