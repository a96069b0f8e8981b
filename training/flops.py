"""The numbers behind MFU: training FLOPs per token, and the peak FLOP/s of the device.

MFU = (tokens/s per device) × (FLOPs per token) / (peak FLOP/s of one device). The FLOP count is the
model's, not what the hardware ran: recomputation under activation checkpointing is not counted
(that would be HFU), nor are the elementwise ops. docs/training.md gives the formula.

The peak comes from `log.peak_flops_per_device` when set, else from this table by the device's name,
for the precision the matmuls run in: bf16 (and fp16) on the tensor cores; fp32 on the tensor cores
as TF32 only where PyTorch allows TF32 (`torch.backends.cuda.matmul.allow_tf32`, or a
`float32_matmul_precision` other than "highest"), otherwise the plain fp32 rate. A device not in the
table (and every CPU) gets no MFU rather than a guess.
"""

from __future__ import annotations

# Dense (no structured sparsity) peak FLOP/s per device, from the vendors' data sheets.
# Checked in order, first match wins: a more specific name ("H100 PCIe", "L40S") before its prefix.
PEAK_FLOPS_TABLE: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM; H100 80GB HBM3
    ("H800", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181.0e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("RTX 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),  # fp32 accumulation
    ("V100", {"fp16": 125.0e12, "fp32": 15.7e12}),  # no bf16 tensor cores
]
# fp16 runs at the bf16 rate wherever both exist.
PRECISIONS = ("bf16", "fp16", "fp32")


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·d_head·T.

    N is the weight count of every matmul (q, k, v, o, the augmented shortcuts' two projections,
    gate, up, down, and the LM head; not the embedding, which is a lookup, nor norms and SIAF
    coefficients, which are elementwise): 2 FLOPs per weight per token forward, 4 backward.
    Attention's score and value products add 12·L·H·d_head·T (PaLM, appendix B), counted over the
    whole T×T square as PaLM and most published MFU figures do, though a causal kernel skips half.
    """
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    attention = d * q_width * 2 + d * kv_width * 2  # q, o and k, v projections
    shortcut = config.shortcut_count * 2 * d * config.shortcut_width
    mlp = 3 * d * f
    matmul_weights = L * (attention + shortcut + mlp) + d * config.vocab_size  # + the LM head
    return 6.0 * matmul_weights + 12.0 * L * q_width * seq_len


def tf32_enabled() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def lookup_peak(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The table's peak for a device name (as torch.cuda.get_device_name gives it) and precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for key, peaks in PEAK_FLOPS_TABLE:
        if key.lower() in device_name.lower():
            if precision == "fp32":
                return peaks.get("tf32" if tf32 else "fp32") or peaks.get("fp32")
            if precision == "fp16":
                return peaks.get("fp16") or peaks.get("bf16")
            return peaks.get("bf16")
    return None


def device_name() -> str | None:
    """The current CUDA device's name, or None where there is none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken driver means no known peak, not a failed run
        return None


def peak_flops(configured: float | None, precision: str) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table's for the GPU's name."""
    if configured:
        return float(configured)
    name = device_name()
    if name is None:
        return None
    return lookup_peak(name, precision, tf32=precision == "fp32" and tf32_enabled())


def throughput(tokens: int, seconds: float, world: int, per_token: float | None, peak: float | None) -> dict:
    """{tokens_per_s (all processes), tokens_per_s_per_gpu, mfu (None without a peak or a FLOP count)}
    for `tokens` trained by `world` processes in `seconds` of wall time."""
    total = tokens / seconds if seconds > 0 else 0.0
    per_gpu = total / world
    mfu = per_gpu * per_token / peak if peak and per_token else None
    return {"tokens_per_s": total, "tokens_per_s_per_gpu": per_gpu, "mfu": mfu}
