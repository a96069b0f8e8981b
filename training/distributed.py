"""The processes of a run: the process group every rank joins, whatever launched it, and the few
collective operations the trainer needs."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

from . import launch


class QuietExit(Exception):
    """A rank other than 0 stopping because rank 0 found a problem (rank 0 alone reports it)."""


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
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker: its parent is torchrun's agent, and a SIGKILLed agent must not leave it
        # running (ranks that `--nproc` spawns get the same request from their launcher).
        launch.die_with_parent()
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


def end_distributed() -> None:
    """Destroy the process group, and DeepSpeed's cached clone of its world group with it: a later
    run in the same Python process (a notebook, a test session) builds both afresh instead of
    handing DeepSpeed a group of a destroyed world."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    groups._WORLD_GROUP = None
