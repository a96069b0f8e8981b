"""The training core that every recipe runs on.

A recipe (training/recipes/: pretrain, sft, dpo, grpo) supplies its model, its data stream and its loss
through the `Recipe` interface below. The core runs it, one named step at a time:

    claim       rank 0 makes OUT this run's (training/run_folder.py: one run per folder, a lock)
    plan        rank 0 checks everything that can fail, before the model exists; every rank gets it
    resume      forget unfinished saves, pick the newest complete checkpoint (its universal form on
                another process count)
    build       the model (the speed settings apply here), then the DeepSpeed engine
                (training/engine.py), then the checkpoint's state
    per step    micro-steps (data, forward + loss, backward, DeepSpeed's step) over the accumulation;
                the guard; evaluation now and then (training/evaluation.py); a checkpoint now and
                then (training/checkpoint.py)
    finish      the recipe writes what the run leaves behind

No host synchronisation in the step loop: losses and metrics stay on the device and are read back
once per logged step (`train.log_every`, every skipped step, the last); phase times are measured only
with `log.phase_times` (training/timing.py). The non-finite guard reads no tensor: DeepSpeed
already decides whether each update is applied (a non-finite gradient norm discards it and leaves
the LR schedule where it was), and `engine.was_step_applied()` says so on the host; `train.max_bad_steps`
skipped steps in a row stop the run. Test hooks and user hooks enter through one interface,
training/callbacks.py.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from pangu_pi import run_layout as layout
from pangu_pi.config import ConfigError
from pangu_pi.errors import UserError

from . import checkpoint as ckpt
from . import faults, launch, run_folder, speed
from . import sequence_parallel as sequence_parallel_
from .callbacks import Callback, CallbackList
from .config import BatchSplit, RunConfig, dump_yaml, resolved_dict, yaml_text
from .distributed import Dist, end_distributed, init_distributed, quiet_libraries
from .engine import deepspeed_config, param_groups
from .timing import PhaseTimer

__all__ = ["Recipe", "Trainer", "TrainingStopped", "train"]


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
    progress: bool = True
    # Set by the core before the engine is built: None, or the run's sequence parallelism
    # (training/sequence_parallel.py), whose `causal_lm_loss` a recipe's `loss` calls on whole sequences.
    sequence_parallel: Any = None
    rows_per_sample: int = 1  # rows one sample adds to a forward (a DPO pair: 2)

    def plan(self, world_size: int, progress: bool) -> Any:
        raise NotImplementedError

    def setup(self, plan: Any, d: Dist) -> None:
        raise NotImplementedError

    def build_model(self, ds_config: dict):
        raise NotImplementedError

    def prepare(self, engine, d: Dist, resume_from: Path | None) -> None:
        """Once the engine holds its starting (or resumed) state, before the first step."""

    def loss(self, engine, batch, d: Dist):
        """(loss tensor for backward, tokens in the batch as an int) for one micro-batch, or (loss,
        tokens, {name: scalar tensor}) with metrics the core averages over micro-batches and
        processes and logs beside the loss. Return tensors, not numbers: reading a value back
        waits for the device."""
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
# The run


def train(recipe: Recipe, *, progress: bool = True, callbacks: list[Callback] | tuple = (),
          force: bool = False) -> dict:
    """Run `recipe` to its last step on every rank of the current process group (created here from
    the launcher's environment, or as a group of one). `force` replaces the outputs of an earlier run
    in OUT. Returns rank 0's summary: {"out", "step", "loss", "val_loss", "checkpoint", ...what the
    recipe adds}."""
    if not recipe.config.out:
        raise ConfigError("set `out` (the run folder) in the config or pass --out")
    quiet_libraries()
    recipe.progress = progress
    env = None if launch.in_distributed_launch() else launch.single_process_env()
    d = init_distributed()
    claim: list[run_folder.Claim] = []

    def claim_and_plan():
        claim.append(run_folder.claim(recipe.config.out, recipe.config.recipe, force=force))
        # Sequence parallelism: N ranks share each sequence, so the batch splits over world / N.
        return claim[0].run_id, recipe.plan(sequence_parallel_.data_parallel_world(recipe.config, d.world), progress)

    try:
        run_id, plan = d.share_from_rank0(claim_and_plan)
        recipe.setup(plan, d)
        return Trainer(recipe, d, run_id, progress, CallbackList([*callbacks, *faults.from_env()])).run()
    finally:
        for c in claim:
            c.release()
        sequence_parallel_.teardown()
        end_distributed()
        if env is not None:
            launch.restore_env(env)


class Trainer:
    """One run of a recipe on this rank: the steps of `run`, in order."""

    def __init__(self, recipe: Recipe, d: Dist, run_id: str, progress: bool, callbacks: CallbackList):
        self.recipe, self.d, self.run_id, self.progress, self.callbacks = recipe, d, run_id, progress, callbacks
        self.config, self.split, self.stream = recipe.config, recipe.split, recipe.train_stream
        self.stream = speed.prefetching(self.stream, d.device)  # pinned and read ahead on CUDA; as is on CPU
        self.out = Path(self.config.out)
        self.root = layout.checkpoint_root(self.out)
        self.rank0 = d.rank == 0
        self.max_steps = recipe.total_steps
        self.start_step = self.bad_steps = self.tokens_seen = 0
        self.summary: dict[str, Any] = {"out": str(self.out), "step": 0, "loss": None, "val_loss": None,
                                        "checkpoint": None}

    def run(self) -> dict:
        self.find_resume_point()
        self.build_engine()
        self.restore()
        self.open_logs()
        try:
            self.engine.train()
            self.interval_start, self.interval_tokens = time.perf_counter(), 0
            for step in range(self.start_step + 1, self.max_steps + 1):
                applied = self.optimizer_step(step)
                logged = step % self.config.train.log_every == 0 or not applied or step == self.max_steps
                if logged:
                    self.log_step(step, applied)
                else:
                    self.logger.advance()
                self.guard(step, applied)
                self.evaluate(step)
                self.save(step)
                if self.callbacks:
                    self.callbacks.on_step_end(step)
            self.finish()
        finally:
            self.logger.close()
        return self.summary

    # -- resume ----------------------------------------------------------------------------------

    def find_resume_point(self) -> None:
        """Forget unfinished saves, then take the newest complete checkpoint; one written by another
        process count is converted (once) to DeepSpeed's universal form."""
        d = self.d
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            for gone in ckpt.remove_incomplete(self.root):
                print(f"removed unfinished checkpoint {gone}", file=sys.stderr)
        d.barrier()
        self.resume_from = ckpt.latest_checkpoint(self.root) if self.config.checkpoint.resume == "auto" else None
        self.universal = False
        if self.resume_from is not None and ckpt.read_state(self.resume_from)["world_size"] != d.world:
            self.universal = True
            d.share_from_rank0(lambda: ckpt.universal_folder(self.resume_from))

    # -- build -----------------------------------------------------------------------------------

    def build_engine(self) -> None:
        import deepspeed
        import numpy as np
        import torch

        from .schedule import lr_scheduler, make_schedule

        config = self.config
        ds_config = deepspeed_config(config, self.split, self.d.device.type == "cuda")
        if self.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)

        # The model, and what changes how it runs (activation checkpointing, compiled blocks, the fused
        # loss: training/speed.py) before DeepSpeed wraps it.
        model = self.recipe.build_model(ds_config)
        self.speed = speed.apply_speed_features(model, config.train, ds_config["zero_optimization"]["stage"])
        if config.train.tiled_mlp:
            from .tiled_compute import tile_token_wise_modules

            self.speed["tiled_modules"] = tile_token_wise_modules(model)
        # Ulysses attention registered for this model, SP and SP×DP groups built (DeepSpeed reduces
        # gradients and partitions ZeRO state over all ranks, and divides by the DP degree).
        self.sp = self.recipe.sequence_parallel = sequence_parallel_.setup(
            model, config, self.d, self.split.micro_batch_size * self.recipe.rows_per_sample)
        self.dp_rank, self.dp_world = (self.sp.dp_rank, self.sp.dp_world) if self.sp else (self.d.rank, self.d.world)

        schedule = make_schedule(config.schedule, self.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, config.optim.weight_decay),
            config=ds_config,
            lr_scheduler=lambda opt: lr_scheduler(opt, schedule),
            mpu=self.sp.mpu if self.sp else None,
        )

    def restore(self) -> None:
        d = self.d
        self.trainer_state: dict = {}
        if self.resume_from is not None:
            rank_state, self.trainer_state = ckpt.load_checkpoint(
                self.engine, self.resume_from, rank=d.rank, world_size=d.world, universal=self.universal)
            self.stream.load_state_dict(rank_state["data"])
            self.start_step = self.trainer_state["step"]
            self.bad_steps = self.trainer_state.get("bad_steps", 0)
            self.tokens_seen = self.trainer_state.get("tokens_seen", 0)
        self.summary["step"] = self.start_step
        self.recipe.prepare(self.engine, d, self.resume_from)

    def open_logs(self) -> None:
        from .flops import peak_flops
        from .metrics import RunLogger

        config, recipe = self.config, self.recipe
        vocab = getattr(recipe.model_config, "vocab_size", None) if recipe.name == "pretrain" else None
        self.resolved = resolved_dict(config, self.split, vocab_size=vocab)
        if self.rank0:
            dump_yaml(self.resolved, self.out / layout.RUN_CONFIG)
        self.logger = RunLogger(self.out, enabled=self.rank0, start_step=self.start_step, max_steps=self.max_steps,
                                tensorboard=config.log.tensorboard, progress=self.progress, desc=recipe.name,
                                wandb_project=config.log.wandb, run_config=self.resolved)
        if self.resume_from is not None:
            where = f"{self.resume_from} (step {self.start_step})"
            if self.universal:
                where += f", written by {self.trainer_state['world_size']} processes, through its universal form"
            self.logger.message(f"resumed from {where}")
            if self.trainer_state.get("run_id") != self.run_id:
                self.logger.message(
                    f"warning: resuming from {self.resume_from}, which no run of this folder wrote; its DeepSpeed "
                    "files are read with torch.load(weights_only=False), which runs any code hidden in them: "
                    "resume only from checkpoints you trust")
        n_params = None
        try:
            from pangu_pi.parameters import count_parameters

            n_params = count_parameters(recipe.model_config)["total"]
        except Exception:  # a recipe's model outside the PanGu-π family: no count, no harm
            pass
        for line in recipe.describe(self.d, n_params).splitlines():
            self.logger.message(line)
        if self.sp:
            self.logger.message(self.sp.describe())
        self.summary.update(sequence_parallel=self.sp.size if self.sp else 1, data_parallel=self.dp_world)
        self.logger.message(f"speed: activation checkpointing {self.speed['activation_checkpointing']}, "
                            f"{self.speed['compiled_blocks']} compiled blocks, "
                            f"{'fused' if self.speed['fused_loss'] else 'plain'} loss"
                            + (f", {self.speed['tiled_modules']} tiled FFN/shortcut modules"
                               if self.speed.get("tiled_modules") else ""))
        self.fpt = recipe.flops_per_token()
        self.peak = peak_flops(config.log.peak_flops_per_device, config.train.precision)
        self.timer = PhaseTimer(config.log.phase_times, self.d.device)

    # -- one optimizer step ----------------------------------------------------------------------

    def micro_step(self, step: int):
        """One micro-batch: data, forward and loss, backward, DeepSpeed's step (which applies the
        update only at the accumulation boundary). Returns device tensors; nothing is read back."""
        recipe, engine, d, timer = self.recipe, self.engine, self.d, self.timer
        # The ranks of an SP group read the same samples (each keeps its slice of the tokens).
        batch = self.stream.next_batch(self.split.micro_batch_size, self.dp_rank, self.dp_world)
        timer.mark("data")
        loss, n_tokens, *extra = recipe.loss(engine, batch, d)
        if self.callbacks:
            loss = self.callbacks.on_loss(step, loss)
        timer.mark("forward")
        engine.backward(loss)
        timer.mark("backward")
        engine.step()
        timer.mark("optimizer")
        return loss.detach(), n_tokens, (extra[0] if extra else None)

    def optimizer_step(self, step: int) -> bool:
        """The accumulation's micro-steps; whether DeepSpeed applied the update (a host flag)."""
        import torch

        self.timer.begin_step()
        self.lr = self.scheduler.get_last_lr()[0]
        losses, metrics, tokens = [], [], 0
        for _ in range(self.split.grad_accum):
            loss, n_tokens, extra = self.micro_step(step)
            losses.append(loss)
            tokens += n_tokens
            if extra:
                metrics.append(extra)
        self.step_loss = torch.stack(losses).mean()
        self.step_metrics = metrics
        step_tokens = tokens * self.d.world
        self.tokens_seen += step_tokens
        self.interval_tokens += step_tokens
        return self.engine.was_step_applied()

    def log_step(self, step: int, applied: bool) -> None:
        """Read the step's loss, gradient norm and metrics back (one all-reduce, one wait) and log them."""
        import torch

        d = self.d
        names = list(self.step_metrics[0]) if self.step_metrics else []
        norm = self.engine.get_global_grad_norm()
        values = [self.step_loss.double(), torch.as_tensor(float("nan") if norm is None else norm,
                                                           dtype=torch.float64, device=d.device)]
        for name in names:
            values.append(torch.stack([torch.as_tensor(m[name], dtype=torch.float64, device=d.device)
                                       for m in self.step_metrics]).mean())
        both = torch.stack(values)
        d.sum_(both)
        loss, grad_norm, *means = (both / d.world).tolist()
        now = time.perf_counter()
        tps = self.interval_tokens / max(now - self.interval_start, 1e-9)
        self.interval_start, self.interval_tokens = now, 0
        per_device = tps / d.world
        row = {"step": step, "loss": loss, "lr": self.lr, "grad_norm": None if norm is None else grad_norm,
               "tokens_per_s": tps, "tokens_per_s_per_gpu": per_device,
               "mfu": per_device * self.fpt / self.peak if self.peak and self.fpt else None,
               "skipped": not applied, "tokens": self.tokens_seen, **dict(zip(names, means)), **self.timer.read()}
        if self.sp:
            row["sequence_parallel"] = self.sp.size
        self.logger.step(row)
        self.summary.update(step=step, loss=loss)
        self.last_row = row
        # The run's throughput for the summary: from the first logged step (which carries start-up and
        # compilation) to the last, read where the loss read-back has waited for the device anyway.
        mark = (now, self.tokens_seen)
        self.throughput_from = getattr(self, "throughput_from", None) or mark
        self.throughput_to = mark

    def guard(self, step: int, applied: bool) -> None:
        """Count updates DeepSpeed discarded for a non-finite gradient norm; too many in a row stop the run."""
        if applied:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        row = self.last_row
        self.logger.message(f"step {step}: non-finite loss ({row['loss']}) or gradient norm ({row['grad_norm']}); "
                            f"update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.config.train.max_bad_steps:
            newest = ckpt.latest_checkpoint(self.root)
            where = f"resume from {newest}" if newest else "restart"
            raise TrainingStopped(
                f"stopped at step {step}: {self.bad_steps} optimizer steps in a row had a non-finite loss or "
                f"gradient norm; {where} with a lower optim.lr or a longer schedule.warmup_steps"
            )

    # -- evaluate and save -----------------------------------------------------------------------

    def evaluate(self, step: int) -> None:
        every = self.config.eval.every
        if not every or (step % every and step != self.max_steps):
            return
        val = self.recipe.evaluate(self.engine, self.d)
        self.engine.train()
        if val is None:
            return
        val, val_metrics = val if isinstance(val, tuple) else (val, None)
        self.summary["val_loss"] = val
        if val_metrics:
            self.summary.update(val_metrics)
        self.logger.validation(step, val, val_metrics)

    def save(self, step: int) -> None:
        if step % self.config.checkpoint.save_every and step != self.max_steps:
            return
        d, stream = self.d, self.stream
        path = ckpt.save_checkpoint(
            self.engine, self.root, step, rank=d.rank, world_size=d.world,
            rank_state={"data": stream.state_dict()},
            trainer_state={"bad_steps": self.bad_steps, "tokens_seen": self.tokens_seen,
                           "samples_consumed": stream.samples_consumed, "recipe": self.recipe.name,
                           "run_id": self.run_id},
            files={layout.RUN_CONFIG: yaml_text(self.resolved),
                   **self.recipe.checkpoint_files()},
            keep_last=self.config.checkpoint.keep_last,
            callbacks=self.callbacks or None,
        )
        if self.config.log.plot:
            self.logger.plot(self.root / layout.LOSS_PLOT)
        self.summary["checkpoint"] = str(path)

    # -- finish ----------------------------------------------------------------------------------

    def report_throughput(self) -> None:
        """tokens/s per GPU and MFU over the run (after its first logged step) in the summary and the log."""
        from .flops import throughput

        start, end = getattr(self, "throughput_from", None), getattr(self, "throughput_to", None)
        if start is None or end[1] <= start[1] or end[0] <= start[0]:
            return
        figures = throughput(end[1] - start[1], end[0] - start[0], self.d.world, self.fpt, self.peak)
        self.summary.update(tokens_per_s_per_gpu=figures["tokens_per_s_per_gpu"], mfu=figures["mfu"])
        mfu = f"MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] is not None else "MFU unknown (no peak FLOP/s)"
        self.logger.message(f"throughput: {figures['tokens_per_s_per_gpu']:.0f} tokens/s per GPU "
                            f"({figures['tokens_per_s']:.0f} in all), {mfu}")

    def finish(self) -> None:
        if self.summary["checkpoint"] is None and self.resume_from is not None:
            self.summary["checkpoint"] = str(self.resume_from)
            self.logger.message(f"{self.resume_from} is already at step {self.max_steps}, the last; nothing to train")
        if self.callbacks:
            self.callbacks.on_train_end(self.engine, self.recipe, self.d)
        self.report_throughput()
        if isinstance(self.stream, speed.PrefetchingStream):
            self.stream.close()
        self.engine.eval()
        self.recipe.finish(self.engine, self.d, self.summary)
        if self.rank0 and self.config.log.plot:
            self.logger.plot(self.out / layout.LOSS_PLOT)
        self.d.barrier()
