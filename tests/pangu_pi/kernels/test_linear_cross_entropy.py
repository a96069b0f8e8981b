"""The fused LM head + cross-entropy against the plain loss: value, both gradients, memory.

Inputs are fresh random draws on every run; a failing assertion prints the seed, and
PANGU_PI_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pangu_pi.kernels import linear_cross_entropy
from pangu_pi.kernels.linear_cross_entropy import IGNORE_INDEX, default_chunk_size, linear_cross_entropy_reference


@pytest.fixture
def seed():
    value = int(os.environ.get("PANGU_PI_TEST_SEED") or secrets.randbelow(2**31))
    torch.manual_seed(value)
    return value


def packed_labels(batch: int, seq: int, vocab: int, eos: int = 0) -> torch.Tensor:
    """Rows of several documents packed end to end, as the data stream makes them: each document
    ends with EOS, and (as fine-tuning does) the tokens of the first document of a row and of the
    position after each EOS are not counted."""
    labels = torch.randint(1, vocab, (batch, seq))
    for row in range(batch):
        cuts = sorted(torch.randperm(seq - 2)[:3].add(1).tolist())
        for c in cuts:
            labels[row, c] = eos
            labels[row, c + 1] = IGNORE_INDEX  # the next document's first token predicts nothing here
        labels[row, : cuts[0] // 2] = IGNORE_INDEX
    return labels


def both(hidden, weight, labels, **kw):
    """(loss, d hidden, d weight) of the fused and of the plain loss, on separate copies of the leaves."""
    out = []
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        extra = kw if fn is linear_cross_entropy else {k: v for k, v in kw.items() if k == "reduction"}
        loss = fn(h, w, labels, **extra)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, None, 10_000])
def test_fp32_equals_plain_loss_and_gradients_with_ignored_labels_and_packed_documents(seed, chunk):
    B, T, D, V = 3, 41, 32, 257
    hidden, weight = torch.randn(B, T, D), torch.randn(V, D) * 0.3
    labels = packed_labels(B, T, V)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    (loss, gh, gw), (ref, rgh, rgw) = both(hidden, weight, labels, chunk_size=chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    ignored = labels.reshape(-1) == IGNORE_INDEX
    assert gh.reshape(-1, D)[ignored].abs().max() == 0  # an ignored position gets no gradient


def test_sum_reduction_and_num_items_in_batch(seed):
    hidden, weight = torch.randn(2, 16, 8), torch.randn(50, 8)
    labels = packed_labels(2, 16, 50)
    (loss, gh, gw), (ref, rgh, rgw) = both(hidden, weight, labels, reduction="sum", chunk_size=5)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    # transformers' convention: the sum over this micro-batch divided by the count over the whole step.
    scaled = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=40, chunk_size=5)
    torch.testing.assert_close(scaled, ref / 40, atol=1e-6, rtol=1e-5)


def test_frozen_weight_and_no_grad_give_the_same_loss(seed):
    hidden, weight = torch.randn(30, 16), torch.randn(99, 16)
    labels = torch.randint(0, 99, (30,))
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, chunk_size=8)  # the head frozen (LoRA)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    linear_cross_entropy_reference(h_ref, weight, labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unneeded = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    torch.testing.assert_close(unneeded, ref, atol=1e-5, rtol=1e-5)


def test_a_scaled_loss_scales_the_gradients(seed):
    hidden, weight = torch.randn(12, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (12,))
    (3.0 * linear_cross_entropy(hidden, weight, labels, chunk_size=5)).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (3.0 * linear_cross_entropy_reference(h2, w2, labels)).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_no_counted_token_is_nan_as_in_the_plain_loss():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.full((4,), IGNORE_INDEX)
    assert torch.isnan(linear_cross_entropy_reference(hidden, weight, labels))
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))


def test_bf16_stays_close_to_the_fp32_loss(seed):
    hidden, weight = torch.randn(2, 24, 64), torch.randn(300, 64) * 0.2
    labels = packed_labels(2, 24, 300)
    (ref, rgh, rgw), _ = both(hidden, weight, labels, chunk_size=None)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2, msg=f"seed {seed}")
    torch.testing.assert_close(h.grad.float(), rgh, atol=2e-3, rtol=5e-2, msg=f"seed {seed}")
    torch.testing.assert_close(w.grad.float(), rgw, atol=2e-3, rtol=5e-2, msg=f"seed {seed}")
    # and as close to the plain bf16 loss (the same matmul in bf16, the rest in fp32)
    plain = linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), labels)
    torch.testing.assert_close(loss, plain, atol=1e-4, rtol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_probe_no_tokens_by_vocab_tensor_exists_at_once():
    N, D, V = 512, 32, 4000
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    chunk = 64
    with LargestTensor() as probe:
        linear_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    assert probe.largest <= max(chunk * V, V * D)  # one chunk's logits, or the weight's gradient
    assert probe.largest < N * V
    with LargestTensor() as plain:  # the probe sees the full logits where they exist
        linear_cross_entropy_reference(hidden, weight, labels).backward()
    assert plain.largest >= N * V


def test_default_chunk_is_bounded_and_whole_tiles():
    rows = default_chunk_size(16384, 100_883)
    assert rows % 64 == 0 and 4 * rows * 100_883 <= 256 * 2**20
    assert default_chunk_size(10, 100_883) == 10
    assert default_chunk_size(10**6, 10**9) == 64  # never below one tile, however large the vocabulary


def test_bad_arguments_are_refused():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab"):
        linear_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("how", ["labels", "shift_labels"])
def test_the_model_with_fused_loss_gives_the_plain_loss_and_gradients(seed, how):
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM

    config = PanGuPiConfig.from_preset("tiny", vocab_size=300, num_hidden_layers=2, siaf_backend="reference")
    model = PanGuPiForCausalLM(config)
    ids = torch.randint(0, 300, (2, 17))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt that is not trained on
    kwargs = {"labels": labels} if how == "labels" else {"shift_labels": labels[:, 1:]}
    if how == "shift_labels":
        ids = ids[:, :-1]
    results = []
    for fused in (False, True):
        model.zero_grad()
        model.fused_loss = fused
        out = model(input_ids=ids, **kwargs)
        out.loss.backward()
        assert (out.logits is None) == fused  # the fused loss forms no logits
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    assert fused_grads.keys() == plain_grads.keys() and "lm_head.weight" in fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=f"{name}, seed {seed}")


class MatmulCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_grad_computes_no_gradients_on_the_way():
    """Under no_grad (evaluation with labels) the forward takes one matmul a chunk, the logits', not the
    three a chunk that the gradients of the hidden states and the weight add; same loss."""
    N, D, V, chunk = 256, 16, 500, 64
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with MatmulCount() as training:
        want = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    with torch.no_grad(), MatmulCount() as evaluating:
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    assert evaluating.count == N // chunk < training.count
    torch.testing.assert_close(got, want.detach())
