"""Moved: the preference (DPO) recipe is training/recipes/dpo.py (`pangu_pi.training.recipes.dpo`);
run it with `pangu-pi finetune` and `finetune.mode: dpo`. The old names resolve there, with a note."""

from ._moved import moved_names

__getattr__ = moved_names(__name__, dict.fromkeys(
    ("PreferenceTuning", "dpo_loss", "sequence_logps", "load_pairs", "METRICS"),
    "pangu_pi.training.recipes.dpo"))
