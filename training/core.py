"""The training core that every recipe runs on.

A recipe (training/pretrain.py, training/finetune.py, and the ones to come) supplies three things
through the `Recipe` interface below: its model, its data stream and its loss. Everything else
lives here once:

- process group and device set-up (`init_distributed`), whatever launched the processes;
- the DeepSpeed engine (`deepspeed_config`, `param_groups`, `build_model`);
- the step loop with gradient accumulation, where every rank reads its micro-batches at global
  sample offsets (the data position is one number for all ranks);
- the non-finite guard: a step whose loss or gradient norm is not finite is skipped (DeepSpeed
  discards the update and leaves the LR schedule where it was); `train.max_bad_steps` in a row stop
  the run;
- periodic evaluation, metrics (metrics.jsonl, TensorBoard, W&B, the loss plot) and progress;
- crash-safe checkpoints (training/checkpoint.py) and exact resume, on the same process count or,
  through DeepSpeed's universal checkpoint, on another one;
- the test-only fault hooks (training/faults.py), inert unless their variables are set.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pangu_pi.config import ConfigError
from pangu_pi.errors import UserError

from . import faults as faults_
from . import launch
from .config import BatchSplit, RunConfig, dump_yaml, resolved_dict


class QuietExit(Exception):
    """A rank other than 0 stopping because rank 0 found a problem (rank 0 alone reports it)."""


class TrainingStopped(UserError):
    """The non-finite guard gave up."""


# ------------------------------------------------------------------------------------------------
# What a recipe supplies


class Recipe:
    """One training recipe: a model, a data stream and a loss. Subclasses override what they need.

    Life cycle, driven by `train`: `plan(world)` on rank 0 (every check that can fail, before the
    model exists; its result is shared with every rank), `setup(plan, dist)` on every rank (data
    streams, `total_steps`, `model_config`), then the core builds the engine from `build_model`,
    runs the loop calling `loss` per micro-batch and `evaluate` now and then, saves
    `checkpoint_files` with every checkpoint, and calls `finish` once at the end.
    """

    name = "train"
    config: RunConfig
    split: BatchSplit
    total_steps: int
    model_config: Any
    train_stream: Any  # next_batch(n, rank, world) -> batch; samples_consumed; state_dict(); load_state_dict()

    def plan(self, world_size: int, progress: bool) -> Any:
        raise NotImplementedError

    def setup(self, plan: Any, d: Dist) -> None:
        raise NotImplementedError

    def build_model(self, ds_config: dict):
        raise NotImplementedError

    def prepare(self, engine, d: Dist, resume_from: Path | None) -> None:
        """Once the engine holds its starting (or resumed) state, before the first step."""

    def loss(self, engine, batch, d: Dist):
        """(loss tensor for backward, tokens in the batch) for one micro-batch, or (loss, tokens,
        {name: scalar tensor}) with metrics the core averages over micro-batches and processes and
        logs beside the loss."""
        raise NotImplementedError

    def evaluate(self, engine, d: Dist) -> float | tuple[float, dict] | None:
        """The held-out loss, or (loss, {"val_NAME": value}) with more to log beside it."""
        return None

    def checkpoint_files(self) -> dict:
        return {}

    def describe(self, d: Dist, n_params: int | None) -> str:
        return f"{self.name}: {self.total_steps} steps on {d.world} process(es)"

    def flops_per_token(self) -> float | None:
        return None

    def finish(self, engine, d: Dist, summary: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# The command line every recipe shares


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """`--config --out --max-steps --save-every --resume --nproc --set`, the same for every recipe."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="run config YAML (docs/training.md; examples in configs/)")
    p.add_argument("--out", help="run folder (default: the config's `out`, else runs/CONFIG_NAME)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train to (train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (checkpoint.save_every)")
    p.add_argument("--resume", choices=("auto", "none"), help="auto: continue from the newest complete checkpoint")
    p.add_argument("--nproc", type=int, help="spawn N local processes (CPU or one node) instead of using a launcher")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and metrics.jsonl still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    return p


def run_config_from_args(args: argparse.Namespace, recipe: str) -> RunConfig:
    """The run config a recipe's command line names: the file, then the flags, then each --set."""
    from .config import build_config, load_yaml, run_folder

    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "checkpoint.save_every"),
                      ("resume", "checkpoint.resume")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = build_config(load_yaml(args.config), overrides, recipe=recipe)
    config.out = run_folder(args.config, args.out, config.out)
    return config


# ------------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(config: RunConfig, split: BatchSplit, on_gpu: bool) -> dict:
    t, o = config.train, config.optim
    zero: dict[str, Any] = {"stage": t.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    optimizer_params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if not (on_gpu and t.offload_optimizer):
        # torch's AdamW: nothing to compile at start-up (DeepSpeed's own Adam ops build with a C++
        # compiler on first use); on a GPU its fused kernel is as fast as DeepSpeed's. Fused on CPU
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
    return _merge(ds, config.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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


# ------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: Any

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def share_from_rank0(self, fn):
        """Run fn on rank 0 and hand its result to every rank; an error there stops all ranks."""
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [("ok", fn())]
            except BaseException as err:  # noqa: BLE001 - relayed, then re-raised on rank 0 below
                box = [("error", err)]
                dist.broadcast_object_list([("error", repr(err))], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise QuietExit(value)
        return value

    def mean(self, value):
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def sum_(self, tensor):
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor


def init_distributed() -> Dist:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if not launch.in_distributed_launch():
        launch.single_process_env()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The shared-memory all-reduce is a C++ op built at first use (about a minute); gloo needs nothing.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    import torch.distributed as dist

    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def quiet_libraries() -> None:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*|.*all_gather_into_tensor.*")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# The run


def train(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run `recipe` to its last step on every rank of the current process group (created here from
    the launcher's environment, or as a group of one). Returns rank 0's summary:
    {"out", "step", "loss", "val_loss", "checkpoint", ...what the recipe adds}."""
    if not recipe.config.out:
        raise ConfigError("set `out` (the run folder) in the config or pass --out")
    quiet_libraries()
    recipe.progress = progress
    env = None if launch.in_distributed_launch() else launch.single_process_env()
    d = init_distributed()
    try:
        plan = d.share_from_rank0(lambda: recipe.plan(d.world, progress))
        recipe.setup(plan, d)
        return _loop(recipe, d, progress)
    finally:
        _end_distributed()
        if env is not None:
            launch.restore_env(env)


def _end_distributed() -> None:
    """Destroy the process group, and DeepSpeed's cached clone of its world group with it: a later
    run in the same Python process (a notebook, a test session) builds both afresh instead of
    handing DeepSpeed a group of a destroyed world."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    groups._WORLD_GROUP = None


def _loop(recipe: Recipe, d: Dist, progress: bool) -> dict:
    import deepspeed
    import numpy as np
    import torch

    from . import checkpoint as ckpt
    from .metrics import PLOT_FILE, RunLogger, peak_flops
    from .schedule import lr_scheduler, make_schedule

    config, split = recipe.config, recipe.split
    rank0 = d.rank == 0
    out = Path(config.out)
    root = ckpt.checkpoint_root(out)
    on_gpu = d.device.type == "cuda"
    faults = faults_.active()
    max_steps = recipe.total_steps

    # Resume: forget unfinished saves, then continue from the newest complete checkpoint; one written
    # by another process count is converted (once) to DeepSpeed's universal form.
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for gone in ckpt.remove_incomplete(root):
            print(f"removed unfinished checkpoint {gone}", file=sys.stderr)
    d.barrier()
    resume_from = ckpt.latest_checkpoint(root) if config.checkpoint.resume == "auto" else None
    universal = False
    if resume_from is not None and ckpt.read_state(resume_from)["world_size"] != d.world:
        universal = True
        d.share_from_rank0(lambda: ckpt.universal_folder(resume_from))

    ds_config = deepspeed_config(config, split, on_gpu)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = recipe.build_model(ds_config)
    if config.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schedule = make_schedule(config.schedule, max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, config.optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, schedule),
    )

    start_step, bad_steps, tokens_seen = 0, 0, 0
    if resume_from is not None:
        rank_state, trainer_state = ckpt.load_checkpoint(engine, resume_from, rank=d.rank, world_size=d.world,
                                                         universal=universal)
        recipe.train_stream.load_state_dict(rank_state["data"])
        start_step = trainer_state["step"]
        bad_steps = trainer_state.get("bad_steps", 0)
        tokens_seen = trainer_state.get("tokens_seen", 0)
    recipe.prepare(engine, d, resume_from)

    resolved = resolved_dict(config, split, vocab_size=getattr(recipe.model_config, "vocab_size", None)
                             if recipe.name == "pretrain" else None)
    if rank0:
        dump_yaml(resolved, out / "config.yaml")
    logger = RunLogger(out, enabled=rank0, start_step=start_step, max_steps=max_steps,
                       tensorboard=config.log.tensorboard, progress=progress, desc=recipe.name,
                       wandb_project=config.log.wandb, run_config=resolved)
    if resume_from is not None:
        where = f"{resume_from} (step {start_step})"
        if universal:
            where += f", written by {trainer_state['world_size']} processes, through its universal form"
        logger.message(f"resumed from {where}")
    n_params = None
    try:
        from .memory import count_parameters

        n_params = count_parameters(recipe.model_config)["total"]
    except Exception:  # a recipe's model outside the PanGu-π family: no count, no harm
        pass
    for line in recipe.describe(d, n_params).splitlines():
        logger.message(line)

    fpt = recipe.flops_per_token()
    peak = peak_flops(config.log.peak_flops_per_device, config.train.precision)
    seq_len = config.data.seq_len
    summary: dict[str, Any] = {"out": str(out), "step": start_step, "loss": None, "val_loss": None, "checkpoint": None}
    stream = recipe.train_stream

    def save(step: int) -> Path:
        path = ckpt.save_checkpoint(
            engine, root, step, rank=d.rank, world_size=d.world,
            rank_state={"data": stream.state_dict()},
            trainer_state={"bad_steps": bad_steps, "tokens_seen": tokens_seen,
                           "samples_consumed": stream.samples_consumed, "recipe": recipe.name},
            files={"config.yaml": _yaml_text(resolved), **recipe.checkpoint_files()},
            keep_last=config.checkpoint.keep_last,
            faults=faults,
        )
        if config.log.plot:
            logger.plot(root / PLOT_FILE)
        return path

    engine.train()
    try:
        for step in range(start_step + 1, max_steps + 1):
            t_start = time.perf_counter()
            times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
            lr = scheduler.get_last_lr()[0]
            micro_losses, micro_metrics = [], []
            tokens = 0
            for _ in range(split.grad_accum):
                t = time.perf_counter()
                batch = stream.next_batch(split.micro_batch_size, d.rank, d.world)
                times["data"] += time.perf_counter() - t

                t = time.perf_counter()
                loss, n_tokens, *extra = recipe.loss(engine, batch, d)
                tokens += n_tokens
                if extra:
                    micro_metrics.append(extra[0])
                if faults is not None:
                    loss = faults.poison(step, loss)
                _sync(d.device)
                times["forward"] += time.perf_counter() - t

                t = time.perf_counter()
                engine.backward(loss)
                _sync(d.device)
                times["backward"] += time.perf_counter() - t

                t = time.perf_counter()
                engine.step()  # applies the update only at the accumulation boundary
                _sync(d.device)
                times["optimizer"] += time.perf_counter() - t
                micro_losses.append(loss.detach())

            step_loss = d.mean(torch.stack(micro_losses).mean().item())
            metrics = _mean_metrics(micro_metrics, d)
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
            ok = engine.was_step_applied() and math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
            step_tokens = tokens * d.world
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - t_start
            tps = step_tokens / elapsed
            row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                   "mfu": tps * fpt / (peak * d.world) if peak and fpt else None, "skipped": not ok,
                   "tokens": tokens_seen, **metrics, **{f"{k}_s": v for k, v in times.items()}}
            logger.step(row, write=(step % config.train.log_every == 0 or not ok or step == max_steps))
            summary.update(step=step, loss=step_loss)

            if not ok:
                bad_steps += 1
                logger.message(f"step {step}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); "
                               f"update skipped ({bad_steps} in a row)")
                if bad_steps >= config.train.max_bad_steps:
                    newest = ckpt.latest_checkpoint(root)
                    where = f"resume from {newest}" if newest else "restart"
                    raise TrainingStopped(
                        f"stopped at step {step}: {bad_steps} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm; {where} with a lower optim.lr or a longer schedule.warmup_steps"
                    )
            else:
                bad_steps = 0

            if config.eval.every and (step % config.eval.every == 0 or step == max_steps):
                val = recipe.evaluate(engine, d)
                engine.train()
                if val is not None:
                    val, val_metrics = val if isinstance(val, tuple) else (val, None)
                    summary["val_loss"] = val
                    if val_metrics:
                        summary.update(val_metrics)
                    logger.validation(step, val, val_metrics)
            if step % config.checkpoint.save_every == 0 or step == max_steps:
                summary["checkpoint"] = str(save(step))
            if faults is not None:
                faults.step_done(step)

        if summary["checkpoint"] is None and resume_from is not None:
            summary["checkpoint"] = str(resume_from)
            logger.message(f"{resume_from} is already at step {max_steps}, the last; nothing to train")
        if faults is not None:
            faults.dump_logits(engine, recipe.model_config.vocab_size, d.rank, d.device)
        engine.eval()
        recipe.finish(engine, d, summary)
        if rank0 and config.log.plot:
            logger.plot(out / PLOT_FILE)
        d.barrier()
    finally:
        logger.close()
    return summary


def _mean_metrics(micro: list[dict], d: Dist) -> dict:
    """A recipe's per-micro-batch metrics, averaged over the micro-batches and then the processes."""
    if not micro:
        return {}
    import torch

    names = list(micro[0])
    local = torch.stack([torch.stack([torch.as_tensor(m[k], dtype=torch.float64).to(d.device) for k in names])
                         for m in micro]).mean(0)
    d.sum_(local)
    return {k: v / d.world for k, v in zip(names, local.tolist())}


def _yaml_text(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
