"""Fused Triton kernels for the SIAF-gated product, forward and backward, and their autograd.Function.

    out = (Σ_i c_i · σ(a_i · gate + b_i)) · up

Forward reads `gate` and `up` once and writes `out`. Backward reads `dout`, `gate` and `up` once,
recomputes every σ(z_i) and σ'(z_i) in registers (nothing but the inputs is saved), writes `dgate` and
`dup`, and produces the gradients of a, b and c without atomics: each program owns a strip of rows and
accumulates its per-channel partial sums in registers, writes them to its own row of a
(row_programs, 3, n, width) buffer, and the buffer is summed over its first axis afterwards. For a given
device and shape the grid, and therefore the summation order, is fixed: results are bitwise
reproducible run to run.

All arithmetic is in float32 whatever the storage dtype (fp32, bf16, fp16); outputs are rounded once.
Parameters are (n,) (read with a channel stride of 0) or (n, width); rows may have any stride, so the
two halves of a fused gate/up projection are used in place.

What the CPU tests (TRITON_INTERPRET=1, numpy semantics) do not cover: real code generation (register
pressure, the libdevice calls behind tl.erf/exp), launch configurations tuned for a GPU, and timing.
The block sizes for CUDA below are reasoned, not tuned on hardware.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

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
    M, W, rows_per_program,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, stride_pn, stride_pw,
    N: tl.constexpr, N_POW2: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    PARAM_GRADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
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
    row_start = pid_m * rows_per_program
    for r0 in range(row_start, row_start + rows_per_program, BLOCK_M):
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
        # partial buffer layout: (row_programs, 3, N, W), contiguous.
        terms = tl.arange(0, N_POW2)
        tile = pid_m * 3 * N * W + terms[:, None] * W + cols[None, :]
        tile_mask = (terms < N)[:, None] & col_mask[None, :]
        tl.store(partial_ptr + tile, acc_scale, mask=tile_mask)
        tl.store(partial_ptr + N * W + tile, acc_shift, mask=tile_mask)
        if HAS_WEIGHT:
            tl.store(partial_ptr + 2 * N * W + tile, acc_weight, mask=tile_mask)


def _is_interpreted() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _launch_config(M: int, W: int, n: int, device: torch.device) -> dict:
    """Tile sizes and the number of row programs of the backward grid.

    Every term is evaluated at once on a (terms, rows, cols) tile, so the rows per tile shrink as n
    grows to keep the tile near 2048 values (16 per thread at 4 warps). On a GPU: column tiles wide
    enough for coalesced rows, and enough row programs to fill the machine about 4 times over while the
    partial-sum buffer stays a small fraction of the gradient traffic. Under the interpreter every
    operation is a numpy call with a large fixed cost, so tiles are large, yet small enough that the
    tests' odd widths span several column tiles and their taller shapes several row programs and
    several loop trips per program (every path of the two-stage reduction).
    """
    n_pow2 = triton.next_power_of_2(n)
    if _is_interpreted():
        block_w, block_m, target_programs = 32, 8, 4
    else:
        block_w = min(128, triton.next_power_of_2(W))
        block_m = max(1, min(32, 2048 // (block_w * n_pow2)))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target_programs = 4 * sms
    col_programs = triton.cdiv(W, block_w)
    row_tiles = triton.cdiv(M, block_m)
    row_programs = max(1, min(row_tiles, triton.cdiv(target_programs, col_programs)))
    rows_per_program = triton.cdiv(row_tiles, row_programs) * block_m
    row_programs = triton.cdiv(M, rows_per_program)
    return dict(
        BLOCK_W=block_w,
        BLOCK_M=block_m,
        col_programs=col_programs,
        row_programs=row_programs,
        rows_per_program=rows_per_program,
        num_warps=4,
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as (rows, width) with unit channel stride, without a copy where strides allow."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _param_strides(p: torch.Tensor) -> tuple[int, int]:
    # A scalar-per-term parameter is read as a (n, width) one with channel stride 0.
    return (p.stride(0), 0) if p.dim() == 1 else (p.stride(0), p.stride(1))


def _params(scale, shift, weight):
    """Parameters in one common layout, so one pair of strides addresses all three."""
    ps = [p.contiguous() for p in (scale, shift, weight if weight is not None else scale)]
    return ps[0], ps[1], ps[2]


def siaf_fwd(gate, up, scale, shift, weight, activation):
    width = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    M = g2.shape[0]
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if M == 0 or width == 0:
        return out
    o2 = out.view(-1, width)
    a, b, c = _params(scale, shift, weight)
    stride_pn, stride_pw = _param_strides(a)
    cfg = _launch_config(M, width, scale.shape[0], gate.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), cfg["col_programs"])
    _siaf_fwd_kernel[grid](
        g2, u2, o2, a, b, c,
        M, width, g2.stride(0), u2.stride(0), o2.stride(0), stride_pn, stride_pw,
        N=scale.shape[0], N_POW2=triton.next_power_of_2(scale.shape[0]), ACT=ACTIVATION_IDS[activation],
        HAS_WEIGHT=weight is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def siaf_bwd(dout, gate, up, scale, shift, weight, activation, param_grads=True):
    """(dgate, dup, dscale, dshift, dweight); the parameter gradients are None if not `param_grads`."""
    width = gate.shape[-1]
    n = scale.shape[0]
    d2, g2, u2 = _rows(dout), _rows(gate), _rows(up)
    M = g2.shape[0]
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    cfg = _launch_config(max(M, 1), max(width, 1), n, gate.device)
    # Every slot is written by the kernel; zeros only matter for an empty batch (no launch).
    partial = torch.zeros(
        (cfg["row_programs"] if param_grads else 1, 3, n, width), dtype=torch.float32, device=gate.device
    )
    if M > 0 and width > 0:
        a, b, c = _params(scale, shift, weight)
        stride_pn, stride_pw = _param_strides(a)
        dg2, du2 = dgate.view(-1, width), dup.view(-1, width)
        _siaf_bwd_kernel[(cfg["row_programs"], cfg["col_programs"])](
            d2, g2, u2, dg2, du2, a, b, c, partial,
            M, width, cfg["rows_per_program"],
            d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), stride_pn, stride_pw,
            N=n, N_POW2=triton.next_power_of_2(n), ACT=ACTIVATION_IDS[activation],
            HAS_WEIGHT=weight is not None, PARAM_GRADS=param_grads,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    if not param_grads:
        return dgate, dup, None, None, None
    # Second stage of the reduction: a fixed-order sum over row programs (and over channels for
    # scalar parameters), in float32, then one rounding to each parameter's dtype.
    sums = partial.sum(0)
    if scale.dim() == 1:
        sums = sums.sum(-1)
    dweight = sums[2].to(weight.dtype) if weight is not None else None
    return dgate, dup, sums[0].to(scale.dtype), sums[1].to(shift.dtype), dweight


class SiafTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, scale, shift, weight, activation):
        ctx.activation = activation
        # The parameters are saved as the tensors passed in (not copies): under ZeRO-3 they are
        # re-gathered into the same Parameter before this module's backward runs.
        ctx.save_for_backward(gate, up, scale, shift, weight)
        return siaf_fwd(gate, up, scale, shift, weight, activation)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up, scale, shift, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        param_grads = need[2] or need[3] or need[4]
        dgate, dup, dscale, dshift, dweight = siaf_bwd(
            dout, gate, up, scale, shift, weight, ctx.activation, param_grads=param_grads
        )
        return (
            dgate if need[0] else None,
            dup if need[1] else None,
            dscale if need[2] else None,
            dshift if need[3] else None,
            dweight if need[4] else None,
            None,
        )


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
    return SiafTritonFunction.apply(gate, up, scale, shift, weight, activation)
