"""Plain-torch SIAF-gated product: the specification every fused kernel is tested against.

    siaf_and_mul(gate, up) = (Σ_{i=1..n} c_i · σ(a_i · gate + b_i)) · up          (paper Eq. 7, c = 1)

`scale` holds a_i, `shift` holds b_i and `weight` holds c_i, each of shape (n,) (one scalar per term)
or (n, width) (one value per FFN channel). `weight=None` is the paper's form, every c_i = 1.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

# Base activations σ a SIAF term may use. Each is differentiable twice so gradcheck can run on it.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


_SQRT_HALF = 0.7071067811865476  # 1/√2
_INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π)
_GELU_TANH_K = 0.7978845608028654  # √(2/π)
_GELU_TANH_C = 0.044715


def _silu_with_grad(x):
    s = torch.sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


def _gelu_with_grad(x):
    cdf = 0.5 * (1 + torch.erf(x * _SQRT_HALF))
    return x * cdf, cdf + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _gelu_tanh_with_grad(x):
    inner = _GELU_TANH_K * (x + _GELU_TANH_C * x * x * x)
    t = torch.tanh(inner)
    dinner = _GELU_TANH_K * (1 + 3 * _GELU_TANH_C * x * x)
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner


def _relu_with_grad(x):
    # σ'(0) = 0, as torch's relu backward has it, so every backend agrees at the kink.
    positive = x > 0
    return torch.where(positive, x, torch.zeros_like(x)), positive.to(x.dtype)


def _tanh_with_grad(x):
    t = torch.tanh(x)
    return t, 1 - t * t


def _sigmoid_with_grad(x):
    s = torch.sigmoid(x)
    return s, s * (1 - s)


# (σ(x), σ'(x)) in closed form, for the fused backends: they recompute σ' in backward instead of
# keeping autograd's intermediates. Tested against autograd on ACTIVATIONS in float64; the Triton
# kernels (siaf_triton.py) and the compiled path (siaf_compiled.py, through exp2) spell out the same
# formulas.
ACTIVATION_WITH_GRAD = {
    "silu": _silu_with_grad,
    "gelu": _gelu_with_grad,
    "gelu_tanh": _gelu_tanh_with_grad,
    "relu": _relu_with_grad,
    "tanh": _tanh_with_grad,
    "sigmoid": _sigmoid_with_grad,
}


def check_siaf_args(gate, up, scale, shift, weight, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown SIAF activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dim() == 0:
        raise ValueError("gate and up need a last (channel) dimension")
    if scale.dim() not in (1, 2) or scale.shape[0] == 0:
        raise ValueError(f"SIAF scale has shape {tuple(scale.shape)}; expected (n,) or (n, width) with n >= 1")
    width = gate.shape[-1]
    for name, p in (("scale", scale), ("shift", shift), ("weight", weight)):
        if p is None:
            continue
        if p.dim() not in (1, 2) or p.shape[0] != scale.shape[0] or (p.dim() == 2 and p.shape[1] != width):
            raise ValueError(
                f"SIAF {name} has shape {tuple(p.shape)}; expected (n,) or (n, {width}) with n = {scale.shape[0]}"
            )
    if shift.shape != scale.shape or (weight is not None and weight.shape != scale.shape):
        raise ValueError("SIAF scale, shift and weight must share one shape")


def siaf_and_mul_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    check_siaf_args(gate, up, scale, shift, weight, activation)
    act = ACTIVATIONS[activation]
    out = None
    for i in range(scale.shape[0]):
        term = act(scale[i] * gate + shift[i])
        if weight is not None:
            term = weight[i] * term
        out = term if out is None else out + term
    return out * up


def siaf_and_mul_stacked(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The same function as `siaf_and_mul_reference`, all n terms at once on a (..., n, width) view.

    Where no gradient is taken (generation) the reference backend runs this form: 4 torch ops (5 with
    a learned c) against the per-term loop's 8 (11) for n = 2, i.e. half the kernel launches of a
    decode step's SIAF on a GPU and ~35% less CPU time per call on this CPU (RESULTS.md, 2026-12-04).
    The loop stays the specification: its autograd graph is the one every backend is tested against.
    """
    check_siaf_args(gate, up, scale, shift, weight, activation)
    n = scale.shape[0]
    if scale.dim() == 1:
        # The loop reads (n,) parameters one 0-d value at a time, which never changes the activations'
        # dtype; as (n, 1) tensors they would promote (bf16 activations, fp32 parameters -> fp32).
        scale, shift = scale.to(gate.dtype), shift.to(gate.dtype)
        weight = weight.to(gate.dtype) if weight is not None else None
    terms = ACTIVATIONS[activation](torch.addcmul(shift.view(n, -1), gate.unsqueeze(-2), scale.view(n, -1)))
    if weight is not None:
        terms = terms * weight.view(n, -1)
    return terms.sum(-2) * up


def identity_init(n: int) -> tuple[list[float], list[float], list[float]]:
    """(a, b, c) that make the SIAF equal its base activation: c = (1, 0, …), a = 1, b = 0."""
    return [1.0] * n, [0.0] * n, [1.0] + [0.0] * (n - 1)


def spread_init(n: int, spread: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """(a, b, c) for the paper's form: a = 1 and shifts b spread evenly over [-spread, spread].

    Distinct shifts matter: with a_i and b_i all equal, every term receives the same gradient and the
    terms never become different from one another.
    """
    shifts = [0.0] if n == 1 else [spread * (2 * i / (n - 1) - 1) for i in range(n)]
    return [1.0] * n, shifts, [1.0] * n

