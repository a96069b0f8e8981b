"""CPU fast path for the SIAF-gated product: `torch.compile`d forward and backward.

`siaf_and_mul_compiled` calls the custom op `torch.ops.pangu_pi.siaf_compiled_fwd` (torch.library,
with a fake and an autograd registration; its backward is the op `siaf_compiled_bwd`), whose
implementations are compiled (inductor) functions. It saves only `gate`, `up` and the parameters and
recomputes σ(z_i) and σ'(z_i) in backward, so the per-term intermediates the reference keeps for
backward never exist, and backward allocates nothing full-size but `dgate` and `dup` (peak 3 tensors
against the reference's 7 at n = 2). Forward is one fused loop, and so is backward: for per-channel
parameters, whose gradients are sums over tokens, the loop walks groups of 16 consecutive rows side
by side and leaves a small block of partial sums (see `_build`). Measured figures:
benchmarks/RESULTS.md, "SIAF kernels".

Arithmetic is done in float32 (float64 if any input is float64) and the result is returned in the
promoted dtype of `gate` and `up`; gradients come back in each input's own dtype. The token dimension
is compiled as dynamic; the width stays static (a model constant), so each width compiles once.

Where `torch.compile` cannot run (no C++ compiler, unsupported Python, …) the first call warns once
and every later call goes to the reference. Inside an outer `torch.compile` region the reference is
used too: the outer compiler fuses it anyway, and nesting compiled functions buys nothing. Parameter
gradients are sums over tokens carried in the compute dtype (fp32 for bf16 and fp16 inputs) and
rounded once, to each parameter's dtype.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .reference import check_siaf_args, siaf_and_mul_reference

# Consecutive rows walked side by side in the one-pass per-channel backward (see _build). The partial
# sums it leaves hold (terms × rows / _ROW_GROUP × width) values, a quarter of one input at n = 2.
# Measured at 4096 × 5632 (benchmarks/RESULTS.md): groups of 16 rows beat 4, 8 and 32, and beat
# contiguous slices of the token range, whose many far-apart memory streams the CPU prefetches badly.
_ROW_GROUP = 16

# Inductor settings for both graphs. Inductor stores ("realizes") an intermediate that several ops
# read once it reads more than 4 tensors, and on CPU whenever it contains exp/sigmoid/tanh. Here every
# such intermediate (σ(z_i) and the like, read by dgate and by each gradient summand) would become a
# tokens × width buffer written and read back, in the one-pass backward as much as in the two-loop one
# for token counts off the row group: extra full-size tensors with their page faults and traffic.
# Recomputing them is cheaper, so the first threshold is lifted, and the activations below are
# spelled with exp2, which the CPU heuristic does not count as heavy.
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 64, "realize_acc_reads_threshold": 64}

# Set to the exception's text once compilation has failed; every later call then uses the reference.
_compile_failure: str | None = None

_LOG2E = 1.4426950408889634
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_GELU_TANH_K = 0.7978845608028654
_GELU_TANH_C = 0.044715


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp2(x * -_LOG2E))


# (σ(x), σ'(x)): reference.ACTIVATION_WITH_GRAD with exp, sigmoid and tanh written through exp2 (see
# _INDUCTOR_OPTIONS). The tests hold both to torch's autograd in float64.
def _silu(x):
    s = _sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


def _gelu(x):
    cdf = 0.5 * (1 + torch.erf(x * _SQRT_HALF))
    return x * cdf, cdf + x * _INV_SQRT_2PI * torch.exp2(x * x * (-0.5 * _LOG2E))


def _gelu_tanh(x):
    t = 2 * _sigmoid(2 * _GELU_TANH_K * (x + _GELU_TANH_C * x * x * x)) - 1
    dinner = _GELU_TANH_K * (1 + 3 * _GELU_TANH_C * x * x)
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner


def _relu(x):
    positive = x > 0
    return torch.where(positive, x, torch.zeros_like(x)), positive.to(x.dtype)


def _tanh(x):
    t = 2 * _sigmoid(2 * x) - 1
    return t, 1 - t * t


def _sigmoid_with_grad(x):
    s = _sigmoid(x)
    return s, s * (1 - s)


ACTIVATION_WITH_GRAD_EXP2 = {
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": _relu,
    "tanh": _tanh,
    "sigmoid": _sigmoid_with_grad,
}


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _build(n, sigma, compute, out_dtype, gate_dtype, up_dtype, per_channel):
    """Plain-torch forward and backward for one specialisation; torch.compile fuses each into a pass."""

    def fwd(gate, up, scale, shift, weight):
        g = gate.to(compute)
        s = None
        for i in range(n):
            term, _ = sigma(scale[i].to(compute) * g + shift[i].to(compute))
            if weight is not None:
                term = weight[i].to(compute) * term
            s = term if s is None else s + term
        return (s * up.to(compute)).to(out_dtype)

    def terms(g, gu, scale, shift, weight):
        """Per term: (c_i·σ(z_i), c_i·σ'(z_i), and the summands of the three parameter gradients)."""
        out = []
        for i in range(n):
            a = scale[i].to(compute)
            term, dterm = sigma(a * g + shift[i].to(compute))
            dweight = None
            if weight is not None:
                c = weight[i].to(compute)
                dweight = gu * term
                term, dterm = c * term, c * dterm
            gud = gu * dterm
            out.append((a, term, dterm, gud * g, gud, dweight))
        return out

    def bwd_pointwise(dout, gate, up, scale, shift, weight):
        """(dgate, dup, the per-element summands of dscale, dshift and dweight) for one block of rows."""
        g = gate.to(compute)
        gu = dout.to(compute) * up.to(compute)
        per_term = terms(g, gu, scale, shift, weight)
        s = dgate_factor = None
        for a, term, dterm, *_ in per_term:
            s = term if s is None else s + term
            dgate_factor = a * dterm if dgate_factor is None else dgate_factor + a * dterm
        dgate = (gu * dgate_factor).to(gate_dtype)
        dup = (dout.to(compute) * s).to(up_dtype)
        summands = [t[3] for t in per_term] + [t[4] for t in per_term]
        if weight is not None:
            summands += [t[5] for t in per_term]
        return dgate, dup, summands

    def bwd(dout, gate, up, scale, shift, weight):
        rows, width = gate.shape
        if not per_channel or rows % _ROW_GROUP:
            # Scalar parameters: one flat sum per gradient, which inductor folds into the pointwise loop.
            # Per-channel with a token count off the row group: a second loop reducing over rows (a
            # dynamo guard picks the branch, so at most two graphs per specialisation).
            dgate, dup, summands = bwd_pointwise(dout, gate, up, scale, shift, weight)
            reduce = torch.sum if not per_channel else (lambda x: x.sum(0))  # noqa: E731
            return (dgate, dup, torch.stack([reduce(x) for x in summands]))
        # A per-channel gradient is a sum over tokens, and inductor's C++ backend will not put a
        # reduction over rows into the same loop as a row-major pointwise pass. So the rows are taken
        # _ROW_GROUP at a time and the rows of a group are walked side by side: one pointwise loop over
        # (rows / group, width) computes each row's dgate and dup and adds up the group's summands as it
        # goes. Every input is read once and every σ evaluated once; what is left is a
        # (terms, rows / group, width) block of partial sums, reduced in a small second loop.
        views = [x.view(rows // _ROW_GROUP, _ROW_GROUP, width) for x in (dout, gate, up)]
        dgates, dups, partial = [], [], None
        for q in range(_ROW_GROUP):
            dgate, dup, summands = bwd_pointwise(*(v[:, q] for v in views), scale, shift, weight)
            dgates.append(dgate)
            dups.append(dup)
            partial = summands if partial is None else [p + x for p, x in zip(partial, summands)]
        return (
            torch.stack(dgates, 1).view(rows, width),
            torch.stack(dups, 1).view(rows, width),
            torch.stack(partial).sum(1),
        )

    return fwd, bwd


def _renamed(fn, name: str):
    """`fn` with a code object of its own.

    Dynamo keeps its compiled-graph cache and its recompile limit per code object, and every closure
    made by `_build` shares one. Without a copy per specialisation, the combinations that a test suite
    or a mixed fp32/bf16 run visits would use up that limit and silently run eagerly.
    """
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.lru_cache(maxsize=None)
def _functions(n, activation, per_channel, has_weight, compute, out_dtype, gate_dtype, up_dtype):
    """(eager fwd, eager bwd, compiled fwd, compiled bwd) for one specialisation."""
    fwd, bwd = _build(
        n, ACTIVATION_WITH_GRAD_EXP2[activation], compute, out_dtype, gate_dtype, up_dtype, per_channel
    )
    key = f"{activation}_n{n}_{'channel' if per_channel else 'scalar'}_{'w' if has_weight else 'nw'}"
    fwd, bwd = _renamed(fwd, f"siaf_fwd_{key}"), _renamed(bwd, f"siaf_bwd_{key}")
    return fwd, bwd, torch.compile(fwd, options=_INDUCTOR_OPTIONS), torch.compile(bwd, options=_INDUCTOR_OPTIONS)


def _functions_for(gate, up, scale, shift, weight, activation):
    return _functions(
        scale.shape[0],
        activation,
        scale.dim() == 2,
        weight is not None,
        _compute_dtype(gate, up, scale, shift, weight),
        torch.promote_types(gate.dtype, up.dtype),
        gate.dtype,
        up.dtype,
    )


def _mark_token_dim_dynamic(*tensors):
    # Token counts vary from batch to batch; the channel width is a model constant and stays static
    # so inductor can vectorise the inner loop without a symbolic tail. Sizes 0 and 1 are always
    # specialised by dynamo, so they get their own (small) graphs.
    for t in tensors:
        if t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _run(which: int, args: tuple, gate, up, scale, shift, weight, activation):
    """The compiled function `which` (0 forward, 1 backward) on `args`, or its eager twin.

    The eager twin (the same closed-form formulas, uncompiled) runs where compiling cannot: after a
    compile failure, for an empty batch, and under a Python dispatch mode (opcheck's checks, debugging
    modes), where dynamo does not compile.
    """
    fns = _functions_for(gate, up, scale, shift, weight, activation)
    eager, compiled = fns[which], fns[2 + which]
    if _compile_failure is not None or gate.numel() == 0 or _get_current_dispatch_mode() is not None:
        return eager(*args)
    _mark_token_dim_dynamic(*args[: 3 if which else 2])
    try:
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - a compile failure surfaces as many exception types
        if not _record_compile_failure(exc, eager, *args):
            raise
        return eager(*args)


@torch.library.custom_op("pangu_pi::siaf_compiled_fwd", mutates_args=())
def siaf_compiled_fwd(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: Optional[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    width = gate.shape[-1]
    g2, u2 = gate.reshape(-1, width), up.reshape(-1, width)
    out = _run(0, (g2, u2, scale, shift, weight), gate, up, scale, shift, weight, activation)
    return out.view(gate.shape)


@siaf_compiled_fwd.register_fake
def _(gate, up, scale, shift, weight, activation):
    return torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


@torch.library.custom_op("pangu_pi::siaf_compiled_bwd", mutates_args=())
def siaf_compiled_bwd(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: Optional[torch.Tensor],
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, [dscale; dshift; dweight] stacked as (2 or 3, *scale.shape) in the compute dtype)."""
    width = gate.shape[-1]
    args = (dout.reshape(-1, width), gate.reshape(-1, width), up.reshape(-1, width), scale, shift, weight)
    dgate, dup, sums = _run(1, args, gate, up, scale, shift, weight, activation)
    return dgate.view(gate.shape), dup.view(up.shape), sums.view(-1, *scale.shape)


@siaf_compiled_bwd.register_fake
def _(dout, gate, up, scale, shift, weight, activation):
    k = 3 if weight is not None else 2
    compute = _compute_dtype(gate, up, scale, shift, weight)
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
        torch.empty((k, *scale.shape), dtype=compute, device=gate.device),
    )


def _setup_context(ctx, inputs, output):
    gate, up, scale, shift, weight, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up, scale, shift, weight)


def _backward(ctx, dout):
    gate, up, scale, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dgate, dup, sums = siaf_compiled_bwd(dout, gate, up, scale, shift, weight, ctx.activation)
    # Parameter gradients are sums over tokens, carried in the compute dtype (fp32 for fp32, bf16 and
    # fp16 inputs) and rounded once here.
    dscale = sums[0].to(scale.dtype) if need[2] else None
    dshift = sums[1].to(shift.dtype) if need[3] else None
    dweight = sums[2].to(weight.dtype) if weight is not None and need[4] else None
    return dgate if need[0] else None, dup if need[1] else None, dscale, dshift, dweight, None


siaf_compiled_fwd.register_autograd(_backward, setup_context=_setup_context)


def _record_compile_failure(exc: Exception, eager_fn, *args) -> bool:
    """True (and future calls go to the reference) if `exc` came from compiling, not from the inputs.

    The same function run eagerly is the judge: if it succeeds on the same inputs, the inputs were fine
    and the compiler is what broke.
    """
    global _compile_failure
    try:
        with torch.no_grad():
            eager_fn(*args)
    except Exception:  # noqa: BLE001
        return False
    _compile_failure = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"torch.compile is unavailable for the SIAF op ({_compile_failure.splitlines()[0]}); "
        "using the reference implementation from now on",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def compiled_available() -> bool:
    """False once a compilation attempt has failed in this process."""
    return _compile_failure is None


def siaf_and_mul_compiled(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    check_siaf_args(gate, up, scale, shift, weight, activation)
    if _compile_failure is not None or torch.compiler.is_compiling():
        return siaf_and_mul_reference(gate, up, scale, shift, weight, activation)
    return siaf_compiled_fwd(gate, up, scale, shift, weight, activation)
