"""Fast paths for the one op PanGu-π adds to every layer: the SIAF-gated product of the FFN.

`siaf_and_mul` is the single entry point the HF model, the trainer and the vLLM model call.
"""

from __future__ import annotations

import os

import torch

from .reference import ACTIVATIONS, siaf_and_mul_reference

BACKENDS = ("auto", "reference")
ENV_BACKEND = "PANGU_PI_SIAF_BACKEND"


def resolve_backend(backend: str, device: torch.device) -> str:
    backend = os.environ.get(ENV_BACKEND, backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown SIAF backend {backend!r}; choose one of {BACKENDS} (or set {ENV_BACKEND})")
    return "reference" if backend == "auto" else backend


def siaf_and_mul(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """(Σ_i weight_i · σ(scale_i · gate + shift_i)) · up, with `weight=None` meaning every weight_i = 1."""
    resolve_backend(backend, gate.device)
    return siaf_and_mul_reference(gate, up, scale, shift, weight, activation)


__all__ = ["ACTIVATIONS", "BACKENDS", "siaf_and_mul", "siaf_and_mul_reference"]
