"""Fused LM head + cross-entropy: the next-token loss without the full-vocabulary logits.

The plain loss, `cross_entropy((hidden @ weight.T).float(), labels)`, holds the logits of every
token at once: 4 × 4096 tokens × 100,883 words is 6.6 GB in fp32 per micro-batch, plus their
gradient. Here the tokens go through the head a chunk at a time. For each chunk the forward computes
the logits (in the inputs' dtype, upcast to fp32 as the plain loss does), their log-sum-exp, the
chunk's loss and, when a gradient is wanted, the gradient of the loss with respect to the chunk's
logits (softmax − one-hot, over the number of counted tokens) and from it, at once, the chunk's
share of the gradients of `hidden` and `weight`. The chunk's logits are then dropped, so at most one
chunk of (chunk × vocab) values lives at a time, and backward only scales the stored gradients by
the incoming one (Liger's fused linear cross-entropy does the same; Megatron's vocabulary-parallel
loss is the same computation split over the vocabulary instead of the tokens).

The arithmetic is the plain loss's: the same matmul in the inputs' dtype, log-sum-exp and the
loss summed in fp32, the weight gradient accumulated over chunks in an fp32 buffer (cast to the
weight's dtype once, at the end). Labels equal to `ignore_index` (-100) count for nothing, in the
loss and in the mean's denominator, as in `torch.nn.functional.cross_entropy`; a mean over no
counted token is NaN there and here. Packed documents need nothing special: the loss is per token,
and a document boundary only shows in the labels (and in the attention mask, upstream of this).

Plain torch, so the same code runs on CPU and GPU; no Triton kernel. What it does not cover: the
chunks' matmuls run one after another on one stream (no overlap of a chunk's softmax with the next
chunk's matmul), and the gradients are computed in the forward, so this op assumes one backward per
forward (true of training; a second backward through the same graph is refused by autograd anyway).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Default chunk: about this many bytes of fp32 logits at once (a knob, not a measured optimum; the
# GPU default is to be measured). 256 MiB is 665 tokens at a 100,883 vocabulary, ~25 chunks of a
# 4 × 4096 micro-batch: big enough that each matmul fills a GPU, small beside the 6.6 GB it replaces.
CHUNK_BYTES = 256 * 2**20


def default_chunk_size(n_tokens: int, vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: `chunk_bytes` of fp32 logits, a multiple of 64 rows (whole matmul tiles)."""
    rows = max(64, (chunk_bytes // (4 * max(vocab_size, 1))) // 64 * 64)
    return max(1, min(n_tokens, rows))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, denominator):
        n = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        counted = labels != ignore_index
        if denominator is None:
            denominator = counted.sum() if reduction == "mean" else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 whatever the weight's dtype: ~n/chunk additions of bf16 partial sums would each round.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        if denominator is not None:
            scale = 1.0 / torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, y, keep = hidden[start:end], labels[start:end], counted[start:end]
            logits = (h @ weight.t()).float()  # (C, V): the matmul in the inputs' dtype, as nn.Linear
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            target = y.masked_fill(~keep, 0).unsqueeze(1)  # (C, 1): any valid index where ignored
            picked = logits.gather(1, target).squeeze(1)
            total += ((lse - picked) * keep).sum()
            if not (want_hidden or want_weight):
                continue
            # d loss / d logits = softmax − one-hot, per counted token, times the reduction's scale.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # in place: the logits are no longer needed
            grad.scatter_add_(1, target, -keep.to(grad.dtype).unsqueeze(1))
            row_scale = keep.to(grad.dtype)
            if denominator is not None:
                row_scale = row_scale * scale
            grad.mul_(row_scale.unsqueeze(1))
            grad = grad.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:end] = grad @ weight
            if want_weight:
                if grad.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += (grad.t() @ h).float()
        loss = total * scale if denominator is not None else total
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_hidden = grad_weight = None
        if ctx.has[0]:
            g = next(saved)
            grad_hidden = g * grad_loss.to(g.dtype)
        if ctx.has[1]:
            g = next(saved)
            grad_weight = g * grad_loss.to(g.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """cross_entropy((hidden @ weight.T).float(), labels), never holding all the logits at once.

    hidden: (..., D) activations before the LM head; weight: (V, D), the head's weight; labels: (...)
    the target id of each position (already shifted: labels[t] is the token after position t), or
    `ignore_index`. reduction: "mean" over counted tokens, or "sum"; `num_items_in_batch` (as
    transformers' losses take it) divides the sum by that count instead. Returns an fp32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not (vocab, {hidden.shape[-1]})")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(flat.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat.shape[0], weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    denominator = num_items_in_batch
    if denominator is not None:
        reduction = "sum"
    if not torch.is_grad_enabled():
        # The forward computes the gradients as it goes whenever autograd might ask for them, and
        # grad mode is always off inside it: detached inputs are how a no_grad call skips that work.
        flat, weight = flat.detach(), weight.detach()
    return _LinearCrossEntropy.apply(flat, weight, flat_labels, ignore_index, reduction, chunk_size, denominator)


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index: int = IGNORE_INDEX,
                                   reduction: str = "mean") -> torch.Tensor:
    """The plain loss the fused one is checked against: all the logits, upcast, then cross-entropy."""
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)

