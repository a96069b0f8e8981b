"""Run reporting: FLOPs per token, metrics.jsonl across a resume, TensorBoard and the loss PNG."""

from __future__ import annotations

import json

import pytest

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.training.metrics import (
    RunLogger,
    flops_per_token,
    peak_flops,
    plot_losses,
    read_metrics,
    truncate_metrics,
)


def test_flops_per_token_counts_every_matmul_weight():
    config = PanGuPiConfig.from_preset("tiny", vocab_size=512, siaf_backend="reference")
    model = PanGuPiForCausalLM(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, __import__("torch").nn.Linear))
    seq = 64
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    assert flops_per_token(config, seq) == 6 * matmul + attention


def test_peak_flops_configured_or_unknown_on_cpu():
    assert peak_flops(2e11, "fp32") == 2e11
    assert peak_flops(None, "bf16") is None  # no GPU here: no guess, no MFU


def _row(step, loss):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "mfu": 0.1}


def test_logger_writes_lines_tensorboard_and_truncates_on_resume(tmp_path):
    log = RunLogger(tmp_path, enabled=True, start_step=0, max_steps=6, progress=False)
    for step in range(1, 6):
        log.step(_row(step, 10.0 - step))
    log.validation(4, 6.5)
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    val = [r for r in rows if "val_loss" in r]
    assert val == [{"step": 4, "val_loss": 6.5, "val_ppl": pytest.approx(665.14, rel=1e-4)}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Resumed from the step-3 checkpoint: steps 4 and 5 of the dead run are history no longer.
    log = RunLogger(tmp_path, enabled=True, start_step=3, max_steps=6, progress=False, tensorboard=False)
    log.step(_row(4, 1.0))
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "r1", enabled=False, start_step=0, max_steps=2)
    log.step(_row(1, 1.0))
    log.validation(1, 1.0)
    log.close()
    assert not (tmp_path / "r1").exists()


def test_cut_short_line_is_skipped_and_plot_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_row(s, 5.0 / s)) + "\n" for s in range(1, 4)) + '{"step": 4, "lo')
    assert len(read_metrics(path)) == 3
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    png = plot_losses(path, tmp_path / "ck" / "loss_curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
