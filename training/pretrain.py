"""`pangu-pi pretrain`: pretrain a PanGu-π model with DeepSpeed ZeRO, resumably.

    pangu-pi pretrain --config configs/tiny.yaml --nproc 2            # CPU: spawns 2 gloo processes
    torchrun --nproc_per_node 8 -m training.pretrain --config configs/pangu-pi-1b.yaml --out runs/1b
    deepspeed --hostfile hostfile --module training.pretrain --config configs/pangu-pi-7b.yaml --out /shared/7b

Before any compute is spent the run is checked as a whole: config keys and values, the batch split
over the processes, the tokenizer, and every data shard (truncated, from another tokenizer, ids
outside the vocabulary), so a bad run fails in seconds with one message.

Each optimizer step: every rank reads its micro-batches at global sample offsets (the data stream
is a pure function of the sample index), runs forward/backward through the DeepSpeed engine and
steps at the accumulation boundary. A step whose loss or gradient norm is not finite is skipped
(DeepSpeed discards the update and leaves the LR schedule where it was); `train.max_bad_steps` of
them in a row stop the run. Checkpoints (training/checkpoint.py) carry everything a resume needs, so
a resumed run reproduces the uninterrupted run's losses exactly in fp32.
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

from pangu_pi.cli import UserError
from pangu_pi.config import ConfigError

from . import launch
from .config import BatchSplit, RunConfig, build_config, dump_yaml, load_yaml, resolve_batch, resolved_dict, run_folder

# Test hooks: poison the gradients of these steps (comma-separated) to exercise the non-finite guard,
# and write the trained engine's logits on a fixed input to this path, to compare with an export.
NONFINITE_STEPS_ENV = "PANGU_PI_TEST_NONFINITE_GRAD_STEPS"
DUMP_LOGITS_ENV = "PANGU_PI_TEST_DUMP_LOGITS"


class QuietExit(Exception):
    """A rank other than 0 stopping because rank 0 found a problem (rank 0 alone reports it)."""


class TrainingStopped(UserError):
    """The non-finite guard gave up."""


# ------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pangu-pi pretrain", description="Pretrain a PanGu-π model with DeepSpeed.")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--out", help="run folder (default: the config's `out`, else runs/CONFIG_NAME)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train to (train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (checkpoint.save_every)")
    p.add_argument("--resume", choices=("auto", "none"), help="auto: continue from the newest complete checkpoint")
    p.add_argument("--nproc", type=int, help="spawn N local processes (CPU or one node) instead of using a launcher")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and metrics.jsonl still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by `deepspeed`
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"checkpoint.save_every={args.save_every}")
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    values = load_yaml(args.config)
    config = build_config(values, overrides)
    config.out = run_folder(args.config, args.out, config.out)
    return config


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.nproc is not None and not launch.in_distributed_launch():
        # Check everything (and build the default data) once, here, before starting the ranks.
        prepare_run(config, world_size=args.nproc, progress=not args.no_progress)
        return launch.spawn_local(args.nproc, launch.rank_command(argv))
    try:
        pretrain(config, progress=not args.no_progress)
    except QuietExit:
        return 2
    return 0


# ------------------------------------------------------------------------------------------------
# Checks and data, before any process group or model exists


@dataclass
class RunPlan:
    out: Path
    split: BatchSplit
    tokenizer_dir: Path
    datasets: list[dict]
    vocab_size: int  # the model's
    eos_id: int
    tokenizer_hash: str


def default_data(config: RunConfig, out: Path, progress: bool) -> tuple[Path, list[dict]]:
    """Tokenizer and shards from the embedded default corpus, made once and reused by later runs."""
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import train_tokenizer

    from .data import DataError, prepare_shards, verify_dataset

    d = config.data
    cache = Path(d.cache_dir) if d.cache_dir else out
    part = "all" if d.default_corpus_bytes is None else str(d.default_corpus_bytes)
    files = [str(f) for f in default_corpus_files(d.default_corpus_bytes)]
    tok_dir = train_tokenizer(files, cache / f"tokenizer-default-{part}-{d.tokenizer_vocab_size}",
                              vocab_size=d.tokenizer_vocab_size, progress=progress)
    shards = cache / "data" / f"default-{part}-{tok_dir.name}"
    try:
        from pangu_pi.tokenizer import tokenizer_hash

        verify_dataset(shards, vocab_size=10**9, tokenizer_hash=tokenizer_hash(tok_dir), check_ids=False)
    except (DataError, FileNotFoundError):
        prepare_shards(tok_dir, files, shards, workers=d.workers, progress=progress)
    return tok_dir, [{"path": str(shards), "weight": 1.0}]


def tokenizer_facts(tokenizer_dir: Path) -> tuple[int, int, str]:
    """(vocabulary size with specials, EOS id, hash) of a saved tokenizer."""
    from tokenizers import Tokenizer

    from pangu_pi.tokenizer import EOS, tokenizer_hash

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer {str(tokenizer_dir)!r} holds no tokenizer.json; name the folder "
            "`pangu-pi tokenizer train` wrote, the one the shards were prepared with"
        )
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UserError(f"tokenizer {tokenizer_dir} has no {EOS!r} token to end documents with")
    return tok.get_vocab_size(with_added_tokens=True), eos, tokenizer_hash(tokenizer_dir)


def prepare_run(config: RunConfig, world_size: int, progress: bool = True) -> RunPlan:
    """Every check that can fail without a process group; builds the default data when none is configured."""
    from . import checkpoint
    from .data import DataError, PackedMixture

    out = Path(config.out)
    split = resolve_batch(config.batch, world_size)
    if config.checkpoint.resume == "none" and checkpoint.latest_checkpoint(checkpoint.checkpoint_root(out)):
        newest = checkpoint.latest_checkpoint(checkpoint.checkpoint_root(out))
        raise UserError(
            f"{out} already holds checkpoints (newest {newest.name}) and --resume is none; "
            "pass --resume auto to continue that run, or choose another --out"
        )
    try:
        if config.data.datasets:
            tok_dir, datasets = Path(config.data.tokenizer), config.data.datasets
        else:
            tok_dir, datasets = default_data(config, out, progress)
        tok_vocab, eos_id, digest = tokenizer_facts(tok_dir)
        model = config.model_config(tok_vocab)
        if model.vocab_size < tok_vocab:
            raise ConfigError(
                f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens "
                f"({tok_dir}); remove model.vocab_size to take the tokenizer's, or raise it"
            )
        if model.eos_token_id not in (eos_id, [eos_id]) and not (
            isinstance(model.eos_token_id, list) and eos_id in model.eos_token_id
        ):
            raise ConfigError(f"model.eos_token_id {model.eos_token_id} is not the tokenizer's EOS id {eos_id}")
        common = dict(seq_len=config.data.seq_len, eos_id=eos_id, vocab_size=model.vocab_size,
                      tokenizer_hash=digest, val_fraction=config.data.val_fraction, seed=config.seed)
        PackedMixture(datasets, split="train", **common)  # verifies every shard
        if config.eval.every:
            val = PackedMixture(datasets, split="val", **common)
            if len(val) < world_size:
                raise UserError(
                    f"the validation split has {len(val)} samples, fewer than the {world_size} processes; "
                    "raise data.val_fraction or set eval.every=0"
                )
    except DataError as err:
        raise UserError(str(err)) from None
    return RunPlan(out, split, tok_dir, [dict(d) for d in datasets], model.vocab_size, eos_id, digest)


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
        # compiler on first use); on a GPU its fused kernel is as fast as DeepSpeed's.
        optimizer_params["torch_adam"] = True
        if on_gpu:
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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


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
# Distributed helpers


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


def _quiet_libraries() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_visible() else "cuda")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*|.*all_gather_into_tensor.*")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class _PoisonGrad:
    """Identity forward, NaN gradient: a test of the guard that the loss alone would not trip."""

    @staticmethod
    def apply(loss):
        import torch

        class _F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g * float("nan")

        return _F.apply(loss)


def _poisoned_steps() -> set[int]:
    raw = os.environ.get(NONFINITE_STEPS_ENV, "")
    return {int(s) for s in raw.split(",") if s.strip()}


# ------------------------------------------------------------------------------------------------
# The run


def pretrain(config: RunConfig | dict, *, progress: bool = True) -> dict:
    """Train to `config.train.max_steps` on every rank of the current process group (created here
    from the launcher's environment, or as a group of one). Returns rank 0's summary:
    {"step", "loss", "val_loss", "checkpoint", "out"}."""
    if isinstance(config, dict):
        config = build_config(config)
    if not config.out:
        raise ConfigError("set `out` (the run folder) in the config or pass --out")
    _quiet_libraries()
    dist_ = init_distributed()
    try:
        plan = dist_.share_from_rank0(lambda: prepare_run(config, dist_.world, progress=progress))
        return _train(config, plan, dist_, progress)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: RunConfig, plan: RunPlan, d: Dist, progress: bool) -> dict:
    import deepspeed
    import numpy as np
    import torch
    import torch.nn.functional as F

    from . import checkpoint as ckpt
    from .data import PackedMixture
    from .memory import count_parameters
    from .metrics import PLOT_FILE, RunLogger, flops_per_token, peak_flops
    from .schedule import lr_scheduler, make_schedule

    split, seq_len = plan.split, config.data.seq_len
    rank0 = d.rank == 0
    out, root = plan.out, ckpt.checkpoint_root(plan.out)
    on_gpu = d.device.type == "cuda"

    model_config = config.model_config(plan.vocab_size)
    model_config.use_cache = False
    ds_config = deepspeed_config(config, split, on_gpu)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    n_params = count_parameters(model_config)["total"]  # from the config: ZeRO-3 leaves the tensors empty
    model = build_model(model_config, ds_config, init_from=config.model.get("init_from"))
    if config.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schedule = make_schedule(config.schedule, config.train.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, config.optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, schedule),
    )

    common = dict(seq_len=seq_len, eos_id=plan.eos_id, vocab_size=plan.vocab_size,
                  tokenizer_hash=plan.tokenizer_hash, val_fraction=config.data.val_fraction, seed=config.seed)
    train_data = PackedMixture(plan.datasets, split="train", **common)
    val_data = PackedMixture(plan.datasets, split="val", **common) if config.eval.every else None

    # Resume: forget unfinished saves, then continue from the newest complete checkpoint.
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for gone in ckpt.remove_incomplete(root):
            print(f"removed unfinished checkpoint {gone}", file=sys.stderr)
    d.barrier()
    start_step, bad_steps, tokens_seen = 0, 0, 0
    resume_from = ckpt.latest_checkpoint(root) if config.checkpoint.resume == "auto" else None
    if resume_from is not None:
        rank_state, trainer_state = ckpt.load_checkpoint(engine, resume_from, rank=d.rank, world_size=d.world)
        train_data.load_state_dict(rank_state["data"])
        start_step = trainer_state["step"]
        bad_steps = trainer_state.get("bad_steps", 0)
        tokens_seen = trainer_state.get("tokens_seen", 0)

    resolved = resolved_dict(config, split, vocab_size=plan.vocab_size)
    if rank0:
        dump_yaml(resolved, out / "config.yaml")
    logger = RunLogger(out, enabled=rank0, start_step=start_step, max_steps=config.train.max_steps,
                       tensorboard=config.log.tensorboard, progress=progress)
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} (step {start_step})")
    else:
        logger.message(f"training {n_params / 1e6:.2f} M parameters on {d.world} process(es), ZeRO-{config.train.zero_stage}, "
                       f"{config.train.precision}, batch {split.global_batch_size}×{seq_len} tokens "
                       f"({split.micro_batch_size} per process × {split.grad_accum} accumulation)")

    fpt = flops_per_token(model_config, seq_len)
    peak = peak_flops(config.log.peak_flops_per_device, config.train.precision)
    tokens_per_step = split.global_batch_size * seq_len
    poisoned = _poisoned_steps()
    vocab = model_config.vocab_size
    summary: dict[str, Any] = {"out": str(out), "step": start_step, "loss": None, "val_loss": None, "checkpoint": None}

    def save(step: int) -> Path:
        path = ckpt.save_checkpoint(
            engine, root, step, rank=d.rank, world_size=d.world,
            rank_state={"data": train_data.state_dict()},
            trainer_state={"bad_steps": bad_steps, "tokens_seen": tokens_seen,
                           "samples_consumed": train_data.samples_consumed},
            files={"config.yaml": _yaml_text(resolved), "model/config.json": model_config.to_json_string(),
                   "tokenizer": plan.tokenizer_dir},
            keep_last=config.checkpoint.keep_last,
        )
        logger.plot(root / PLOT_FILE)
        return path

    def evaluate() -> float:
        n = min(config.eval.samples, len(val_data)) // d.world * d.world
        mine = list(range(d.rank, n, d.world))
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        engine.eval()
        with torch.no_grad():
            for i in range(0, len(mine), split.micro_batch_size):
                batch = torch.stack([val_data[j] for j in mine[i : i + split.micro_batch_size]]).to(d.device)
                logits = engine(input_ids=batch[:, :-1]).logits
                total[0] += F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1), reduction="sum")
                total[1] += batch[:, 1:].numel()
        engine.train()
        d.sum_(total)
        return (total[0] / total[1]).item()

    engine.train()
    try:
        for step in range(start_step + 1, config.train.max_steps + 1):
            t_start = time.perf_counter()
            times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
            lr = scheduler.get_last_lr()[0]
            micro_losses = []
            for _ in range(split.grad_accum):
                t = time.perf_counter()
                batch = train_data.next_batch(split.micro_batch_size, d.rank, d.world).to(d.device, non_blocking=True)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                times["data"] += time.perf_counter() - t

                t = time.perf_counter()
                logits = engine(input_ids=inputs).logits
                loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
                if step in poisoned:
                    loss = _PoisonGrad.apply(loss)
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
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
            ok = engine.was_step_applied() and math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - t_start
            tps = tokens_per_step / elapsed
            row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                   "mfu": tps * fpt / (peak * d.world) if peak else None, "skipped": not ok,
                   "tokens": tokens_seen, **{f"{k}_s": v for k, v in times.items()}}
            logger.step(row, write=(step % config.train.log_every == 0 or not ok or step == config.train.max_steps))
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

            if config.eval.every and (step % config.eval.every == 0 or step == config.train.max_steps):
                summary["val_loss"] = evaluate()
                logger.validation(step, summary["val_loss"])
            if step % config.checkpoint.save_every == 0 or step == config.train.max_steps:
                summary["checkpoint"] = str(save(step))

        if summary["checkpoint"] is None and resume_from is not None:
            summary["checkpoint"] = str(resume_from)
            logger.message(f"{resume_from} is already at train.max_steps = {config.train.max_steps}; nothing to do")
        if os.environ.get(DUMP_LOGITS_ENV):
            _dump_logits(engine, vocab, d, Path(os.environ[DUMP_LOGITS_ENV]))
    finally:
        logger.close()
    return summary


def _dump_logits(engine, vocab: int, d: Dist, path: Path) -> None:
    import torch

    ids = (torch.arange(1, 25, dtype=torch.long) * 37 % vocab).unsqueeze(0).to(d.device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float().cpu()
    if d.rank == 0:
        torch.save({"input_ids": ids.cpu(), "logits": logits}, path)


def _yaml_text(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


if __name__ == "__main__":
    from pangu_pi import cli

    sys.exit(cli.main(["pretrain", *sys.argv[1:]]))
