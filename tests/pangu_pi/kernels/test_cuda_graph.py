"""On a GPU: the SIAF op under CUDA-graph capture and inside inductor-compiled code.

These need CUDA and are skipped without it (the CPU suite covers the op's arithmetic through the
Triton interpreter, opcheck and fullgraph tracing). tools/gpu_check.sh runs them on the GPU machine.

The vLLM model cannot be installed there (vLLM's CUDA wheel is not available offline), so its decode
path is rebuilt here with torch alone, step for step as serving/vllm_model.py runs it: one merged
gate/up projection, the SIAF over the two halves of its output (made contiguous, as `forward_cuda`
does), the down projection, residual adds; several layers; one token per sequence. One such step is
captured with `torch.cuda.graph` and replayed on new inputs, and must match the same code run eagerly.
"""

from __future__ import annotations

import pytest
import torch

from pangu_pi.kernels import ENV_BACKEND, resolve_backend, siaf_and_mul, siaf_and_mul_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture and inductor's Triton need a GPU"),
]


def vllm_style_decode_step(x, layers, activation="silu"):
    """x: (tokens, hidden). Each layer: (w_gate_up (2·width, hidden), a, b, c, w_down (hidden, width))."""
    for w_gate_up, a, b, c, w_down in layers:
        gate_up = x @ w_gate_up.t()  # (tokens, 2·width), like MergedColumnParallelLinear
        width = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :width], gate_up[..., width:]
        h = siaf_and_mul(gate.contiguous(), up.contiguous(), a, b, c, activation=activation, backend="auto")
        x = x + h @ w_down.t()
    return x


def make_layers(n_layers, hidden, width, dtype, gen):
    def rand(*shape, std=0.05):
        return (torch.randn(*shape, generator=gen) * std).to("cuda", dtype)

    return [
        (rand(2 * width, hidden), 1 + rand(2, width, std=0.2), rand(2, width, std=0.5), 1 + rand(2, width, std=0.1),
         rand(hidden, width))
        for _ in range(n_layers)
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vllm_style_decode_step_replays_from_a_cuda_graph(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    layers = make_layers(4, 256, 704, dtype, gen)
    static_x = torch.randn(8, 256, generator=gen).to("cuda", dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # Warm-up with the kernel the capture will pick, so Triton compiles and loads it outside the capture.
    monkeypatch.setenv(ENV_BACKEND, "triton")
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(2):
            vllm_style_decode_step(static_x, layers)
    torch.cuda.current_stream().wait_stream(stream)
    monkeypatch.delenv(ENV_BACKEND)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_out = vllm_style_decode_step(static_x, layers)
        # Inside the capture "auto" reads the capture flag (host-side) and picks the fused kernel.
        picked = resolve_backend("auto", static_x.device, dtype, 8, 704)
    assert picked == "triton"
    for seed in (1, 2):
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
        static_x.copy_(x)
        graph.replay()
        with torch.inference_mode():
            eager = vllm_style_decode_step(x, layers, activation="silu")
        # Eager at 8 tokens runs the reference (cheapest call), the graph the Triton kernel: both
        # compute in fp32 and round once in bf16, so they agree to bf16 rounding.
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(static_out, eager, **tol)


def test_inductor_inlines_the_triton_op_and_matches_eager():
    gen = torch.Generator().manual_seed(0)
    layers = make_layers(2, 256, 704, torch.bfloat16, gen)
    x = torch.randn(64, 256, generator=gen).to("cuda", torch.bfloat16)
    compiled = torch.compile(vllm_style_decode_step, fullgraph=True, mode="reduce-overhead")
    with torch.inference_mode():
        eager = vllm_style_decode_step(x, layers)
        for _ in range(3):  # record, then replay the CUDA graph
            out = compiled(x, layers).clone()
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_inductor_inlines_the_triton_op_in_training():
    # train.compile compiles each decoder block: inside that graph "auto" picks the Triton op, so its
    # registered backward (the backward triton_op) runs in inductor's backward graph too.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen).to("cuda").requires_grad_()
    w = (torch.randn(2 * 704, 64, generator=gen) * 0.1).to("cuda").requires_grad_()
    a, b, c = ((1 + torch.randn(2, 704, generator=gen) * 0.1).to("cuda").requires_grad_() for _ in range(3))

    def block(x, w, a, b, c, op):
        gate, up = (x @ w.t()).chunk(2, dim=-1)
        return op(gate, up, a, b, c).square().sum()

    leaves = [x, w, a, b, c]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_loss = block(*ref_leaves, siaf_and_mul_reference)
    ref_loss.backward()
    fused = lambda *args: siaf_and_mul(*args, backend="auto")  # noqa: E731
    loss = torch.compile(block, fullgraph=True)(*leaves, fused)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-3, atol=1e-4)
