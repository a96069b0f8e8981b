"""`pangu-pi pretrain`: pretrain (or continue pretraining) a PanGu-π model with DeepSpeed ZeRO, resumably.

    pangu-pi pretrain --config configs/tiny.yaml --nproc 2            # CPU: spawns 2 gloo processes
    torchrun --nproc_per_node 8 -m pangu_pi.training.pretrain --config configs/pangu-pi-1b.yaml --out runs/1b
    deepspeed --hostfile hostfile --module pangu_pi.training.pretrain --config configs/pangu-pi-7b.yaml --out /shared/7b

The command (training/command.py) over the pretraining recipe (training/recipes/pretrain.py) and the
training core (training/core.py).
"""

from __future__ import annotations

import sys

from . import command, recipes
from ._moved import moved_names
from .config import RunConfig


def main(argv: list[str]) -> int:
    return command.main(argv, "pretrain")


def pretrain(config: RunConfig | dict, *, progress: bool = True, force: bool = False) -> dict:
    """Train to `config.train.max_steps` on every rank of the current process group (created here
    from the launcher's environment, or as a group of one). Returns rank 0's summary:
    {"step", "loss", "val_loss", "checkpoint", "out"}."""
    return recipes.run(config, "pretrain", progress=progress, force=force)


# Names this module held before the recipes became a package.
__getattr__ = moved_names(__name__, {
    **dict.fromkeys(("RunPlan", "Pretraining", "default_data", "tokenizer_facts", "prepare_run"),
                    "pangu_pi.training.recipes.pretrain"),
    **dict.fromkeys(("build_model", "deepspeed_config", "param_groups"), "pangu_pi.training.engine"),
    **dict.fromkeys(("Dist", "QuietExit", "init_distributed"), "pangu_pi.training.distributed"),
    "TrainingStopped": "pangu_pi.training.core",
    "check_resume": "pangu_pi.training.checkpoint",
    "build_parser": "pangu_pi.training.command",
})

if __name__ == "__main__":
    sys.exit(command.run_as_main("pretrain"))
