"""Fast paths for the one op PanGu-π adds to every layer: the SIAF-gated product of the FFN.

`siaf_and_mul` is the single entry point the HF model, the trainer and the vLLM model call.

Backends:
- "reference": plain torch (reference.py), the specification; about 3n+2 passes over the tensor and n
  intermediates kept for backward.
- "compiled": `torch.compile`d forward and backward in one autograd.Function (siaf_compiled.py),
  saving only the inputs; the CPU fast path. Falls back to the reference where compilation fails.
- "triton": fused Triton forward and backward kernels (siaf_triton.py); CUDA tensors, or CPU tensors
  under TRITON_INTERPRET=1 (tests only: the interpreter is slow).
- "auto": triton for CUDA tensors of a dtype it takes, compiled on CPU, reference otherwise.

A `backend` passed explicitly (the model's `config.siaf_backend`) wins; when it is "auto", the
environment variable PANGU_PI_SIAF_BACKEND may force one backend for the whole process.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .reference import ACTIVATIONS, siaf_and_mul_reference

BACKENDS = ("auto", "reference", "compiled", "triton")
ENV_BACKEND = "PANGU_PI_SIAF_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed and working in this process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import siaf_triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install shows up as anything from ImportError on
        return False
    return True


def _triton_takes(device: torch.device, dtype: torch.dtype | None) -> bool:
    if device.type != "cuda" or not triton_available():
        return False
    from .siaf_triton import SUPPORTED_DTYPES

    return dtype is None or dtype in SUPPORTED_DTYPES


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that `siaf_and_mul` runs for tensors on `device` of `dtype`."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown SIAF backend {backend!r}; choose one of {BACKENDS} (or set {ENV_BACKEND})")
    if backend != "auto":
        return backend
    if _triton_takes(device, dtype):
        return "triton"
    if device.type in ("cpu", "cuda"):
        from .siaf_compiled import compiled_available

        if compiled_available():
            return "compiled"
    return "reference"


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
    """(Σ_i weight_i · σ(scale_i · gate + shift_i)) · up, with `weight=None` meaning every weight_i = 1.

    `scale`, `shift` and `weight` are (n,) or (n, width); `gate` and `up` have any leading shape.
    """
    chosen = resolve_backend(backend, gate.device, gate.dtype)
    if chosen == "triton":
        from .siaf_triton import siaf_and_mul_triton

        return siaf_and_mul_triton(gate, up, scale, shift, weight, activation)
    if chosen == "compiled":
        from .siaf_compiled import siaf_and_mul_compiled

        return siaf_and_mul_compiled(gate, up, scale, shift, weight, activation)
    return siaf_and_mul_reference(gate, up, scale, shift, weight, activation)


# The LM head's fused loss (plain torch, one path for CPU and GPU): the trainer's `train.fused_loss`.
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402

__all__ = ["ACTIVATIONS", "BACKENDS", "ENV_BACKEND", "linear_cross_entropy", "resolve_backend", "siaf_and_mul",
           "siaf_and_mul_reference"]
