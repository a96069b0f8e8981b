"""Held-out evaluation during training, written once for every recipe.

Each process scores every world-th item of the held-out set in micro-batches, under no_grad, and
the sums are added over the processes. Every process runs the same number of forwards (the set is
cut to a multiple of the process count), because under ZeRO-3 each forward gathers the weights
collectively. A recipe supplies only `score(engine, items) -> 1-D tensor of sums` for one
micro-batch (a loss sum and a token count, or more); the mean it reports is its own business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def sharded_sums(engine, d, items: Sequence, micro_batch: int, score: Callable, width: int):
    """Σ over every process of `score(engine, items[i:i + micro_batch])` (a float64 tensor of `width`
    sums, on `d.device`; the same on every process). Leaves the engine in eval mode."""
    import torch

    n = len(items) // d.world * d.world
    mine = list(items[d.rank:n:d.world])
    total = torch.zeros(width, dtype=torch.float64, device=d.device)
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), micro_batch):
            total += score(engine, mine[i:i + micro_batch]).to(total)
    d.sum_(total)
    return total


def token_loss_sums(logits, labels, ignore_index: int = -100, shift: bool = True):
    """(Σ next-token cross-entropy over the counted tokens, their count) as one tensor. `labels` are
    the input sequence, -100 where no loss is taken, and the logits are shifted against them; with
    `shift=False` they are already the next tokens (pretraining feeds x[:, :-1] and scores x[:, 1:])."""
    import torch
    import torch.nn.functional as F

    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    targets = labels.reshape(-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                           ignore_index=ignore_index, reduction="sum")
    return torch.stack([loss.double(), (targets != ignore_index).sum().double()])
