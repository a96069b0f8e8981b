"""The speed features of training/speed.py on a tiny model: activation checkpointing modes and
compiled blocks give the eager model's loss and gradients; the prefetching stream trains on what
the plain stream gives. (Through the trainer: tests/training/test_speed_trainer.py.)"""

from __future__ import annotations

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.config import ConfigError
from pangu_pi.training import speed


def tiny_model(backend="reference", seed=0):
    torch.manual_seed(seed)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=256, num_hidden_layers=2, siaf_backend=backend)
    return PanGuPiForCausalLM(config)


def loss_and_grads(model, ids):
    model.zero_grad()
    model.train()
    out = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("value, mode", [(True, "full"), (False, "none"), (None, "none"), ("full", "full"),
                                         ("none", "none"), ("selective", "selective"), ("Selective", "selective")])
def test_activation_checkpointing_values(value, mode):
    assert speed.ac_mode(value) == mode


def test_an_unknown_checkpointing_mode_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="none, full or selective"):
        speed.ac_mode("some")


# "auto" is the compiled SIAF on CPU: its first compilation takes about a minute.
@pytest.mark.parametrize("backend", ["reference", pytest.param("auto", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_loss_and_gradients_as_none(mode, backend):
    ids = torch.randint(0, 256, (2, 33))
    plain = loss_and_grads(tiny_model(backend), ids)
    model = tiny_model(backend)
    assert speed.apply_activation_checkpointing(model, mode) == mode
    assert all(block.gradient_checkpointing for block in speed.decoder_blocks(model))
    assert_same(loss_and_grads(model, ids), plain)


class CountRecomputed(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmuls run while autograd computes gradients (recomputation happens there)."""

    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.mm += 1
        return func(*args, **(kwargs or {}))


def _backward_matmuls(model, ids):
    model.train()
    loss = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
    with CountRecomputed() as count:
        loss.backward()
    return count.mm


def test_selective_recomputes_no_matmul_and_full_recomputes_them():
    ids = torch.randint(0, 256, (2, 17))
    none = _backward_matmuls(tiny_model(), ids)
    full, selective = tiny_model(), tiny_model()
    speed.apply_activation_checkpointing(full, "full")
    speed.apply_activation_checkpointing(selective, "selective")
    assert _backward_matmuls(full, ids) > none  # the blocks' forward matmuls run again
    assert _backward_matmuls(selective, ids) == none  # their outputs were kept


def test_fused_loss_switch_reaches_the_model():
    model = tiny_model()
    assert speed.apply_fused_loss(model, True, zero_stage=2) is True and model.fused_loss is True
    ids = torch.randint(0, 256, (2, 17))
    assert model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).logits is None
    assert speed.apply_fused_loss(model, False, zero_stage=2) is False and model.fused_loss is False


@pytest.mark.slow  # ~30 s of compilation on two cores
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    ids = torch.randint(0, 256, (2, 17))
    eager = loss_and_grads(tiny_model(), ids)
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert speed.apply_compile(model) == 2
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their names
    assert_same(loss_and_grads(model, ids), eager, atol=1e-5)


class Stream:
    """The data stream's contract: batches a pure function of the position."""

    def __init__(self):
        self.samples_consumed = 0

    def batch(self, start, n):
        return torch.arange(start, start + n).unsqueeze(1).repeat(1, 4)

    def next_batch(self, n, rank=0, world_size=1):
        out = self.batch(self.samples_consumed + rank * n, n)
        self.samples_consumed += n * world_size
        return out

    def state_dict(self):
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state):
        self.samples_consumed = state["samples_consumed"]


def test_prefetching_stream_trains_on_what_the_stream_gives_and_saves_its_position():
    plain, ahead = Stream(), speed.PrefetchingStream(Stream(), pin_batches=False)
    for _ in range(3):
        torch.testing.assert_close(ahead.next_batch(2, rank=1, world_size=2), plain.next_batch(2, rank=1, world_size=2))
    assert ahead.state_dict() == plain.state_dict() == {"samples_consumed": 12}  # not the position read ahead
    ahead.load_state_dict({"samples_consumed": 4})  # a resume moves the position: the read-ahead is dropped
    plain.load_state_dict({"samples_consumed": 4})
    torch.testing.assert_close(ahead.next_batch(2, 1, 2), plain.next_batch(2, 1, 2))
    ahead.close()


def test_no_prefetching_or_pinning_on_cpu():
    stream = Stream()
    assert speed.prefetching(stream, torch.device("cpu")) is stream
    batch = torch.ones(2, 3)
    assert speed.to_device(batch, torch.device("cpu")) is batch
