"""Fused Triton kernels for the SIAF-gated product, forward and backward, as torch.library ops.

    out = (Σ_i c_i · σ(a_i · gate + b_i)) · up

Forward reads `gate` and `up` once and writes `out`. Backward reads `dout`, `gate` and `up` once,
recomputes every σ(z_i) and σ'(z_i) in registers (nothing but the inputs is saved), writes `dgate` and
`dup`, and produces the gradients of a, b and c without atomics: each program owns a strip of
ROWS_PER_PROGRAM rows, accumulates its per-channel partial sums in fp32 registers, writes them to its
own row of an fp32 (row_programs, 2 or 3, n, width) buffer, and the buffer is summed over its first
axis in fp32 afterwards; each parameter gradient is rounded once, to its own dtype. The strip length
is a per-width constant (`launch_config`), so the summation order, and the bits, depend on the shape
alone: results are reproducible run to run, and no partial sum spans more than one strip of rows.

The ops (`torch.ops.pangu_pi.siaf_triton_fwd` / `siaf_triton_bwd`) are `torch.library.triton_op`s
on a GPU, with autograd registered on the forward: `torch.compile(fullgraph=True)` traces through them
without a graph break, inductor launches the kernels from its own generated code, and CUDA graphs
capture them. Launch parameters come from a per-shape cache and the grid is a formula of the token
count: a call does no host synchronisation and reads no tensor value on the host.

All arithmetic is in float32 whatever the storage dtype (fp32, bf16, fp16); outputs are rounded once.
Parameters are (n,) (read with a channel stride of 0) or (n, width); rows may have any stride, so the
two halves of a fused gate/up projection are used in place.

Fusing SIAF into the gate/up projection's epilogue (one GEMM writing `out` instead of gate and up)
would save the write and re-read of gate and up: at decode, where the GEMM reads ~0.1 GB of weights
per layer and gate/up are a few kB, nothing measurable; at prefill, 2/3 of this op's traffic, about
5% of the FFN's time at 4096 tokens. It needs a GEMM template (cuBLASLt has no custom epilogue; a
Triton or CUTLASS GEMM would replace cuBLAS in the projection) and it was not done: without a GPU in
the session that wrote this it could not be measured against cuBLAS, so whether it pays stays open.

What the CPU tests (TRITON_INTERPRET=1, numpy semantics) do not cover: real code generation (register
pressure, the libdevice calls behind tl.erf/exp), inductor's inlining of the kernels (under the
interpreter the ops are opaque custom ops, see `_define`), bf16 rounding (the interpreter truncates
where a GPU rounds to nearest even, so its bf16 errors are about twice a GPU's), launch
configurations and timing. The block sizes for CUDA are reasoned, not tuned on hardware.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .reference import ACTIVATIONS, check_siaf_args

# Activation ids as the kernels see them (a constexpr, so each activation compiles to its own kernel).
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}
_SILU, _GELU, _GELU_TANH, _RELU, _TANH, _SIGMOID = (ACTIVATION_IDS[k] for k in ACTIVATIONS)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _act_fwd_bwd(x, ACT: tl.constexpr):
    """(σ(x), σ'(x)), the formulas of reference.ACTIVATION_WITH_GRAD; σ'(0) = 0 for relu as in torch.

    The forward kernel uses only σ; the compiler drops the unused σ'. tanh is written through sigmoid
    because tl has no portable tanh (libdevice's does not run in the interpreter); the form saturates
    correctly at ±inf because sigmoid does.
    """
    if ACT == 0:  # silu
        s = tl.sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        y = x * cdf
        dy = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:  # gelu (tanh approximation)
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x)) - 1.0
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 3:  # relu
        pos = x > 0
        y = tl.where(pos, x, 0.0)
        dy = tl.where(pos, 1.0, 0.0)
    elif ACT == 4:  # tanh
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        dy = 1.0 - y * y
    else:  # sigmoid
        y = tl.sigmoid(x)
        dy = y * (1.0 - y)
    return y, dy


@triton.jit
def _load_params(scale_ptr, shift_ptr, weight_ptr, cols, col_mask, W, stride_pn, stride_pw,
                 N: tl.constexpr, N_POW2: tl.constexpr, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """a, b, c as (N_POW2, BLOCK_W) tiles: all terms are evaluated at once on a 3-D tile.

    Terms beyond N (padding up to a power of two) get c = 0, so they add nothing anywhere.
    """
    terms = tl.arange(0, N_POW2)
    offs = terms[:, None] * stride_pn + cols[None, :] * stride_pw
    mask = (terms < N)[:, None] & col_mask[None, :]
    a = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(shift_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        c = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.where(mask, 1.0, 0.0)
    return a, b, c


@triton.jit
def _siaf_fwd_kernel(
    gate_ptr, up_ptr, out_ptr, scale_ptr, shift_ptr, weight_ptr,
    M, W, stride_gate, stride_up, stride_out, stride_pn, stride_pw,
    N: tl.constexpr, N_POW2: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_mask = cols < W
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)  # rows · stride passes 2**31 on large batches
    g = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, b, c = _load_params(
        scale_ptr, shift_ptr, weight_ptr, cols, col_mask, W, stride_pn, stride_pw, N, N_POW2, HAS_WEIGHT
    )
    # (terms, rows, cols)
    term, _ = _act_fwd_bwd(a[:, None, :] * g[None, :, :] + b[:, None, :], ACT)
    s = tl.sum(c[:, None, :] * term, axis=0)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (s * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _siaf_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, scale_ptr, shift_ptr, weight_ptr, partial_ptr,
    M, W,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, stride_pn, stride_pw,
    N: tl.constexpr, N_POW2: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    PARAM_GRADS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_mask = cols < W
    a, b, c = _load_params(
        scale_ptr, shift_ptr, weight_ptr, cols, col_mask, W, stride_pn, stride_pw, N, N_POW2, HAS_WEIGHT
    )
    # Per-term partial sums over this program's rows. Accumulating in registers, not in the output
    # buffer, keeps the program race-free and the summation order fixed.
    acc_scale = tl.zeros([N_POW2, BLOCK_W], dtype=tl.float32)
    acc_shift = tl.zeros([N_POW2, BLOCK_W], dtype=tl.float32)
    acc_weight = tl.zeros([N_POW2, BLOCK_W], dtype=tl.float32)
    row_start = pid_m * ROWS_PER_PROGRAM
    for r0 in range(row_start, row_start + ROWS_PER_PROGRAM, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        # Masked lanes load 0 for dout and up, so they add nothing to any sum below.
        dy = tl.load(dout_ptr + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gu = dy * u
        # (terms, rows, cols)
        term, dterm = _act_fwd_bwd(a[:, None, :] * g[None, :, :] + b[:, None, :], ACT)
        cdterm = c[:, None, :] * dterm
        s = tl.sum(c[:, None, :] * term, axis=0)
        dgate_factor = tl.sum(a[:, None, :] * cdterm, axis=0)
        tl.store(
            dgate_ptr + rows[:, None] * stride_dgate + cols[None, :],
            (gu * dgate_factor).to(dgate_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(dup_ptr + rows[:, None] * stride_dup + cols[None, :], (dy * s).to(dup_ptr.dtype.element_ty), mask=mask)
        if PARAM_GRADS:
            gud = gu[None, :, :] * cdterm
            acc_shift += tl.sum(gud, axis=1)
            acc_scale += tl.sum(gud * g[None, :, :], axis=1)
            if HAS_WEIGHT:
                acc_weight += tl.sum(gu[None, :, :] * term, axis=1)
    if PARAM_GRADS:
        # partial buffer layout: (row_programs, K, N, W) fp32, contiguous, K = 3 with a learned c else 2.
        terms = tl.arange(0, N_POW2)
        tile = pid_m * (3 if HAS_WEIGHT else 2) * N * W + terms[:, None] * W + cols[None, :]
        tile_mask = (terms < N)[:, None] & col_mask[None, :]
        tl.store(partial_ptr + tile, acc_scale, mask=tile_mask)
        tl.store(partial_ptr + N * W + tile, acc_shift, mask=tile_mask)
        if HAS_WEIGHT:
            tl.store(partial_ptr + 2 * N * W + tile, acc_weight, mask=tile_mask)


# Read once: TRITON_INTERPRET is fixed before triton is imported (the @triton.jit decorators above
# already read it), and a read of the knob inside a traced call would break torch.compile's graph.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def _is_interpreted() -> bool:
    return _INTERPRETED


class LaunchConfig(NamedTuple):
    BLOCK_W: int  # channels per program
    BLOCK_M: int  # rows per tile (forward: per program; backward: per trip through the row loop)
    ROWS_PER_PROGRAM: int  # backward: rows one program walks, i.e. the length of its fp32 partial sums
    num_warps_fwd: int
    num_warps_bwd: int


@functools.lru_cache(maxsize=None)
def launch_config(width: int, n: int, elem_size: int, interpreted: bool) -> LaunchConfig:
    """Tile sizes for one (width, terms, storage size): computed once, then a dictionary lookup.

    Nothing here depends on the token count, so the grid is a closed formula of it (cdiv) and a
    compiled graph with a dynamic token dimension needs no guard on it.

    GPU (reasoned for bandwidth, not yet tuned on hardware; tools/gpu_check.sh measures the result):
    - BLOCK_W: 512 channels of a 2-byte dtype (256 of fp32) = 1 KiB per row, so each of 128 threads
      moves one 16-byte vector per row and a warp reads whole 128-byte lines. 5632 = 11 × 512 exactly;
      11008 leaves one half-masked tile in 22 (lanes idle, no extra traffic).
    - BLOCK_M: the (terms, rows, channels) tile holds ~4096 values, i.e. 32 fp32 registers per thread
      and tensor at 4 warps in forward, 16 at 8 warps in backward, where six such tensors are live.
      Forward programs are short and many (8192 × 5632 bf16: 22 528 of them), so the scheduler keeps
      every SM's memory pipe full without a persistent loop.
    - ROWS_PER_PROGRAM (backward): each program walks 128 rows and keeps its parameter-gradient partial
      sums in fp32 registers, then writes them once: (rows/128, 2 or 3, n, width) fp32, ~2.5% of the
      backward's minimal traffic at n = 2, with 32 × 11 = 352 programs at 4096 × 5632. A fixed length
      (not a function of the token count) makes the summation order, and so the bits, a function of
      the shape alone; every partial is a sum of at most 128 rows in fp32, so its error does not grow
      with the batch.
    Interpreter (tests): small tiles so that the test shapes' odd widths span several column tiles, a
    partly masked row tile and several row programs, each with several trips through its loop.
    """
    n_pow2 = triton.next_power_of_2(n)
    if interpreted:
        return LaunchConfig(BLOCK_W=32, BLOCK_M=8, ROWS_PER_PROGRAM=16, num_warps_fwd=4, num_warps_bwd=4)
    block_w = min(triton.next_power_of_2(width), 512 if elem_size <= 2 else 256)
    block_m = max(1, min(32, 4096 // (block_w * n_pow2)))
    rows = max(128, block_m)
    return LaunchConfig(BLOCK_W=block_w, BLOCK_M=block_m, ROWS_PER_PROGRAM=rows, num_warps_fwd=4, num_warps_bwd=8)


def _config_for(x: torch.Tensor, n: int) -> LaunchConfig:
    return launch_config(x.shape[-1], n, x.element_size(), _is_interpreted())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as (rows, width) with unit channel stride, without a copy where strides allow."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _params(scale, shift, weight):
    """a, b, c in one layout (so one pair of strides addresses all three) and those strides.

    A scalar-per-term parameter (n,) is read as an (n, width) one with channel stride 0. Without a
    learned c the kernels never read `weight`; `scale` stands in for the pointer.
    """
    a, b = scale.contiguous(), shift.contiguous()
    c = weight.contiguous() if weight is not None else a
    strides = (a.stride(0), 0) if a.dim() == 1 else (a.stride(0), a.stride(1))
    return a, b, c, strides


def _siaf_fwd(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: Optional[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    width = gate.shape[-1]
    n = scale.shape[0]
    g2, u2 = _rows(gate), _rows(up)
    M = g2.shape[0]
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if M == 0 or width == 0:
        return out
    o2 = out.view(-1, width)
    a, b, c, (stride_pn, stride_pw) = _params(scale, shift, weight)
    cfg = _config_for(gate, n)
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(width, cfg.BLOCK_W))
    wrap_triton(_siaf_fwd_kernel)[grid](
        g2, u2, o2, a, b, c,
        M, width, g2.stride(0), u2.stride(0), o2.stride(0), stride_pn, stride_pw,
        N=n, N_POW2=triton.next_power_of_2(n), ACT=ACTIVATION_IDS[activation],
        HAS_WEIGHT=weight is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_W=cfg.BLOCK_W, num_warps=cfg.num_warps_fwd,
    )  # fmt: skip
    return out


def _siaf_bwd(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: Optional[torch.Tensor],
    activation: str,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = gate.shape[-1]
    n = scale.shape[0]
    k = 3 if weight is not None else 2
    d2, g2, u2 = _rows(dout), _rows(gate), _rows(up)
    M = g2.shape[0]
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if M == 0 or width == 0:
        sums = torch.zeros((k, *scale.shape) if param_grads else (0,), dtype=torch.float32, device=gate.device)
        return dgate, dup, sums
    cfg = _config_for(gate, n)
    row_programs = triton.cdiv(M, cfg.ROWS_PER_PROGRAM)
    # Every slot is written by its program (masked lanes write zeros): no memset.
    partial = torch.empty(
        (row_programs if param_grads else 1, k, n, width), dtype=torch.float32, device=gate.device
    )
    a, b, c, (stride_pn, stride_pw) = _params(scale, shift, weight)
    dg2, du2 = dgate.view(-1, width), dup.view(-1, width)
    wrap_triton(_siaf_bwd_kernel)[(row_programs, triton.cdiv(width, cfg.BLOCK_W))](
        d2, g2, u2, dg2, du2, a, b, c, partial,
        M, width,
        d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), stride_pn, stride_pw,
        N=n, N_POW2=triton.next_power_of_2(n), ACT=ACTIVATION_IDS[activation],
        HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads,
        ROWS_PER_PROGRAM=cfg.ROWS_PER_PROGRAM, BLOCK_M=cfg.BLOCK_M, BLOCK_W=cfg.BLOCK_W,
        num_warps=cfg.num_warps_bwd,
    )  # fmt: skip
    if not param_grads:
        return dgate, dup, partial.new_empty((0,))
    # Second stage: a fixed-order fp32 sum over the row programs (and over channels for scalar
    # parameters). The caller rounds once, to each parameter's dtype.
    sums = partial.sum(0)
    if scale.dim() == 1:
        sums = sums.sum(-1)
    return dgate, dup, sums


def _siaf_fwd_fake(gate, up, scale, shift, weight, activation):
    return torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


def _siaf_bwd_fake(dout, gate, up, scale, shift, weight, activation, param_grads):
    k = 3 if weight is not None else 2
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
        torch.empty((k, *scale.shape) if param_grads else (0,), dtype=torch.float32, device=gate.device),
    )


def _define(name: str, fn, fake):
    """A torch.library op over `fn`.

    On a GPU it is a `triton_op`: torch.compile (inductor) sees the Triton kernels themselves and
    launches them from its generated code, and CUDA graphs capture them. Under TRITON_INTERPRET=1 the
    kernels are plain Python functions that cannot be traced with fake tensors, so the same body is
    registered as an opaque `custom_op` with an explicit fake: the op, its schema, autograd and fake
    registrations are then what opcheck tests on CPU, but not inductor's inlining of the kernels.
    """
    if _is_interpreted():
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, mutates_args=())(fn)


siaf_triton_fwd = _define("pangu_pi::siaf_triton_fwd", _siaf_fwd, _siaf_fwd_fake)
siaf_triton_bwd = _define("pangu_pi::siaf_triton_bwd", _siaf_bwd, _siaf_bwd_fake)


def _setup_context(ctx, inputs, output):
    gate, up, scale, shift, weight, activation = inputs
    ctx.activation = activation
    # The parameters are saved as the tensors passed in (not copies): under ZeRO-3 they are
    # re-gathered into the same Parameter before this module's backward runs.
    ctx.save_for_backward(gate, up, scale, shift, weight)


def param_grads_from_sums(sums, scale, shift, weight, need):
    """(dscale, dshift, dweight) from the fp32 stack [dscale; dshift; dweight], each rounded once."""
    dscale = sums[0].to(scale.dtype) if need[2] else None
    dshift = sums[1].to(shift.dtype) if need[3] else None
    dweight = sums[2].to(weight.dtype) if weight is not None and need[4] else None
    return dscale, dshift, dweight


def _backward(ctx, dout):
    gate, up, scale, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    param_grads = bool(need[2] or need[3] or need[4])
    dgate, dup, sums = siaf_triton_bwd(dout, gate, up, scale, shift, weight, ctx.activation, param_grads)
    dscale, dshift, dweight = param_grads_from_sums(sums, scale, shift, weight, need)
    return dgate if need[0] else None, dup if need[1] else None, dscale, dshift, dweight, None


siaf_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_triton_args(gate, up, scale, shift, weight) -> None:
    """Raise if these tensors cannot go to the Triton kernels (the dispatcher falls back instead)."""
    for name, t in (("gate", gate), ("up", up), ("scale", scale), ("shift", shift), ("weight", weight)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton SIAF kernels take fp32, bf16 or fp16; {name} is {t.dtype}")
        if t.device != gate.device:
            raise ValueError(f"SIAF {name} is on {t.device}, gate on {gate.device}")
    if gate.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError(f"the Triton SIAF kernels need CUDA tensors (or TRITON_INTERPRET=1); got {gate.device}")


def siaf_and_mul_triton(gate, up, scale, shift, weight=None, activation="silu"):
    check_siaf_args(gate, up, scale, shift, weight, activation)
    check_triton_args(gate, up, scale, shift, weight)
    return siaf_triton_fwd(gate, up, scale, shift, weight, activation)
