"""MFU's two numbers: the FLOP formula against a hand count, the peak table by (mocked) device name."""

from __future__ import annotations

import pytest
import torch

from pangu_pi import PanGuPiConfig
from pangu_pi.training import flops
from pangu_pi.training.metrics import peak_flops


def test_flops_per_token_matches_a_hand_count_of_the_tiny_preset():
    config = PanGuPiConfig.from_preset("tiny")  # d 128, ffn 352, 4 layers, 4 heads of 32, 2 KV heads
    # per layer: q,o 2·128·128 + k,v 2·128·64 + shortcut 2·128·8 + gate,up,down 3·128·352 = 186,368
    n = 4 * 186_368 + 128 * 8192  # + the LM head, not the embedding = 1,794,048
    attention = 12 * 4 * 4 * 32 * 64  # 12 · layers · heads · head_dim · seq_len
    assert flops.flops_per_token(config, 64) == 6 * 1_794_048 + attention == 6 * n + 393_216 == 11_157_504


@pytest.mark.parametrize(
    "name, precision, tf32, expected",
    [
        ("NVIDIA H200", "bf16", False, 989.4e12),
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4e12),
        ("NVIDIA H100 PCIe", "bf16", False, 756e12),
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7e12),
        ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
        ("NVIDIA A100 80GB PCIe", "fp16", False, 312e12),
        ("NVIDIA L40S", "bf16", False, 362.05e12),
        ("NVIDIA L40", "bf16", False, 181e12),
        ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2e12),
        ("Tesla V100-SXM2-16GB", "fp16", False, 125e12),
        ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 tensor cores: no peak, no MFU
        ("Some Future GPU", "bf16", False, None),
    ],
)
def test_peak_table_by_device_name(name, precision, tf32, expected):
    assert flops.lookup_peak(name, precision, tf32=tf32) == expected


def test_peak_flops_reads_the_device_name_and_the_override_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert peak_flops(None, "bf16") == 989.4e12
    monkeypatch.setattr(flops, "tf32_enabled", lambda: False)
    assert peak_flops(None, "fp32") == 66.9e12
    monkeypatch.setattr(flops, "tf32_enabled", lambda: True)
    assert peak_flops(None, "fp32") == 494.7e12
    assert peak_flops(5e14, "bf16") == 5e14  # log.peak_flops_per_device
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA B-something")
    assert peak_flops(None, "bf16") is None


def test_no_peak_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops(None, "bf16") is None


def test_throughput_per_gpu_and_mfu():
    # 2 processes, 8192 tokens in 0.5 s, 1e9 FLOPs a token, a 1e13 FLOP/s device.
    out = flops.throughput(8192, 0.5, 2, 1e9, 1e13)
    assert out["tokens_per_s"] == 16384 and out["tokens_per_s_per_gpu"] == 8192
    assert out["mfu"] == pytest.approx(8192 * 1e9 / 1e13)
    assert flops.throughput(8192, 0.5, 2, 1e9, None)["mfu"] is None


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        flops.lookup_peak("NVIDIA H200", "fp8")
