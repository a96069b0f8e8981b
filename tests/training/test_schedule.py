"""Learning-rate schedules: warmup, cosine, warmup-stable-decay, and their state across a resume."""

from __future__ import annotations

import math

import pytest
import torch

from pangu_pi.training.schedule import Schedule, lr_scheduler


def test_cosine_warms_up_then_decays_to_the_floor():
    s = Schedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)  # the first step trains at 1/warmup of the peak, not at zero
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # past the end it stays at the floor
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_linearly():
    s = Schedule("wsd", warmup_steps=5, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [s(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(s(i) == 1.0 for i in range(5, 80))
    assert s(90) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0)


def test_constant_and_unknown():
    assert Schedule("constant", 0, 10)(7) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 0, 10)(3)


def test_scheduler_state_resumes_on_the_same_curve():
    schedule = Schedule("cosine", warmup_steps=3, total_steps=20)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = lr_scheduler(opt, schedule)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    state = sched.state_dict()

    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    again = lr_scheduler(opt2, Schedule("cosine", warmup_steps=3, total_steps=20))
    again.load_state_dict(state)
    assert again.get_last_lr()[0] == pytest.approx(1e-3 * schedule(12))
    assert lrs == pytest.approx([1e-3 * schedule(i) for i in range(12)])
