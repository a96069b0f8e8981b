"""Fast paths for the one op PanGu-π adds to every layer: the SIAF-gated product of the FFN.

`siaf_and_mul` is the single entry point the HF model, the trainer and the vLLM model call.

Backends:
- "reference": plain torch (reference.py), the specification; about 3n+2 passes over the tensor and n
  intermediates kept for backward. Without autograd (generation) its stacked form, the same function
  in half the ops (`siaf_and_mul_stacked`).
- "compiled": `torch.compile`d forward and backward in one autograd.Function (siaf_compiled.py),
  saving only the inputs; the CPU fast path. Falls back to the reference where compilation fails.
- "triton": fused Triton forward and backward kernels (siaf_triton.py); CUDA tensors, or CPU tensors
  under TRITON_INTERPRET=1 (tests only: the interpreter is slow).
- "auto": the first matching rule of an explicit table of (device, dtype, token count, width, inside a
  graph or not) → backend (auto_table.py: the defaults, what each rests on, how to override them).

All three are torch.library ops or plain torch, so `torch.compile(fullgraph=True)` traces any of them
without a graph break: the Triton kernels as `torch.ops.pangu_pi.siaf_triton_fwd` (a triton_op on a
GPU), the compiled path as the custom op `torch.ops.pangu_pi.siaf_compiled_fwd` in eager (inside a
traced graph the reference is traced instead and the outer compiler fuses it). No backend reads a
tensor value on the host.

A `backend` passed explicitly (the model's `config.siaf_backend`) wins; when it is "auto", the
environment variable PANGU_PI_SIAF_BACKEND may force one backend for the whole process.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import auto_table
from .reference import ACTIVATIONS, siaf_and_mul_reference, siaf_and_mul_stacked

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


def _triton_takes(dtype: torch.dtype | None) -> bool:
    if not triton_available():
        return False
    from .siaf_triton import SUPPORTED_DTYPES

    return dtype is None or dtype in SUPPORTED_DTYPES


def _in_graph(device: torch.device) -> bool:
    """Whether this call is being traced by torch.compile or captured into a CUDA graph (host-side
    flags only: neither query synchronises the device)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tokens: int | None = None,
    width: int | None = None,
    graph: bool | None = None,
) -> str:
    """The backend that `siaf_and_mul` runs for `tokens` × `width` tensors of `dtype` on `device`.

    `tokens`/`width` of None read as "large" (the prefill rules); `graph` of None is detected (inside
    torch.compile tracing or CUDA-graph capture). Inside a graph the token count may be symbolic and
    reads as 0: the graph rules do not depend on it.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown SIAF backend {backend!r}; choose one of {BACKENDS} (or set {ENV_BACKEND})")
    if backend != "auto":
        return backend
    if graph is None:
        graph = _in_graph(device)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    tokens = 0 if graph else (2**62 if tokens is None else tokens)
    width = 2**62 if width is None or not isinstance(width, int) else width
    return _auto_choice(device.type, dtype_name, tokens, width, graph)


@torch.compiler.assume_constant_result
def _auto_choice(device_type: str, dtype_name: str, tokens: int, width: int, graph: bool) -> str:
    # Host-side bookkeeping only (cached table lookup, availability flags): torch.compile runs it once
    # while tracing and keeps the answer as a constant of the graph.
    chosen = auto_table.lookup(device_type, dtype_name, tokens, width, graph).backend
    dtype = getattr(torch, dtype_name, None)
    if chosen == "triton" and (not _triton_takes(dtype) or (device_type != "cuda" and not _interpreted())):
        chosen = "compiled"
    if chosen == "compiled":
        from .siaf_compiled import compiled_available

        if not compiled_available():
            chosen = "reference"
    return chosen


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    if backend == "reference":  # the cheapest call: no table lookup
        return _reference(gate, up, scale, shift, weight, activation)
    width = gate.shape[-1]
    tokens = gate.numel() // width if width else 0
    chosen = resolve_backend(backend, gate.device, gate.dtype, tokens, width)
    if chosen == "triton":
        from .siaf_triton import siaf_and_mul_triton

        return siaf_and_mul_triton(gate, up, scale, shift, weight, activation)
    if chosen == "compiled":
        from .siaf_compiled import siaf_and_mul_compiled

        return siaf_and_mul_compiled(gate, up, scale, shift, weight, activation)
    return _reference(gate, up, scale, shift, weight, activation)


def _reference(gate, up, scale, shift, weight, activation):
    # Without autograd (generation) the stacked form: the same function in half the ops.
    if torch.is_grad_enabled():
        return siaf_and_mul_reference(gate, up, scale, shift, weight, activation)
    return siaf_and_mul_stacked(gate, up, scale, shift, weight, activation)


# The LM head's fused loss (plain torch, one path for CPU and GPU): the trainer's `train.fused_loss`.
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402

__all__ = ["ACTIVATIONS", "BACKENDS", "ENV_BACKEND", "linear_cross_entropy", "resolve_backend", "siaf_and_mul",
           "siaf_and_mul_reference"]
