"""The command line of every training recipe: `pangu-pi pretrain` and `pangu-pi finetune` (and
`python -m pangu_pi.training.pretrain|finetune`, what launchers run) take the same flags:

    --config --out --max-steps --save-every --resume auto|none --nproc N --set KEY=VALUE --force --no-progress

With `--nproc N` this process is the launcher: it claims OUT (the lock, training/run_folder.py),
checks the whole run once (data, tokenizer, resume), then spawns N ranks that inherit its claim.
Started by a launcher (torchrun, deepspeed) or alone, the process trains (rank 0 claims OUT).
"""

from __future__ import annotations

import argparse
import os
import sys

from pangu_pi.config import ConfigError
from pangu_pi.errors import UserError
from pangu_pi.overrides import add_set_argument

from . import launch, recipes, run_folder
from .config import RunConfig, build_config, load_yaml, run_folder as default_run_folder
from .distributed import QuietExit

DESCRIPTIONS = {
    "pretrain": "Pretrain a PanGu-π model with DeepSpeed.",
    "finetune": "Fine-tune a checkpoint: chat SFT (full or LoRA) or another recipe named by finetune.mode.",
}


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """`--config --out --max-steps --save-every --resume --nproc --set --force`, the same for every recipe."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="run config YAML (docs/training.md; examples in configs/)")
    p.add_argument("--out", help="run folder (default: the config's `out`, else runs/CONFIG_NAME)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train to (train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (checkpoint.save_every)")
    p.add_argument("--resume", choices=("auto", "none"), help="auto: continue from the newest complete checkpoint")
    p.add_argument("--nproc", type=int, help="spawn N local processes (CPU or one node) instead of using a launcher")
    add_set_argument(p, "override config keys, e.g. optim.lr=1e-4; several pairs after one --set, or --set repeated")
    p.add_argument("--force", action="store_true",
                   help="start over in a run folder this command made: its previous outputs (checkpoints, metrics, "
                        "model) are removed first; files it did not write are never touched")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and metrics.jsonl still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    return p


def run_config_from_args(args: argparse.Namespace, recipe: str) -> RunConfig:
    """The run config a recipe's command line names: the file, then the flags, then each --set."""
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "checkpoint.save_every"),
                      ("resume", "checkpoint.resume")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = build_config(load_yaml(args.config), overrides, recipe=recipe)
    config.out = default_run_folder(args.config, args.out, config.out)
    return config


def main(argv: list[str], recipe: str) -> int:
    """`pangu-pi RECIPE ARGS`: train, or with --nproc launch the ranks that train."""
    args = run_parser(f"pangu-pi {recipe}", DESCRIPTIONS[recipe]).parse_args(argv)
    config = run_config_from_args(args, recipe)
    progress = not args.no_progress
    if args.nproc is not None and not launch.in_distributed_launch():
        claim = run_folder.claim(config.out, recipe, force=args.force)
        try:
            # Every data, tokenizer and resume problem reported once (and the default data built once),
            # before any rank starts.
            from .sequence_parallel import data_parallel_world

            recipes.recipe_for(config).plan(data_parallel_world(config, args.nproc), progress=progress)
            return launch.spawn_local(args.nproc, launch.rank_command(argv, recipe),
                                      env=run_folder.launcher_env(config.out))
        finally:
            claim.release()
    try:
        recipes.run(config, recipe, progress=progress, force=args.force)
    except QuietExit:
        return 2
    return 0


def run_as_main(recipe: str) -> int:
    """`python -m pangu_pi.training.RECIPE ARGS` (what launchers start) as `pangu-pi RECIPE ARGS` runs:
    an error the user can fix is one line naming it and the fix, without a traceback."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would warn on every import otherwise
    try:
        return main(sys.argv[1:], recipe)
    except (UserError, ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"pangu-pi {recipe}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
