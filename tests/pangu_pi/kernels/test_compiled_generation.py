"""The HF model's generation loop compiles in one graph with the SIAF op: static KV cache and
`torch.compile(model.forward, fullgraph=True)` give the eager greedy tokens.

On CPU, "auto" inside the graph traces the reference (inductor fuses it); "triton" puts the op
`torch.ops.pangu_pi.siaf_triton_fwd` in the graph, run by Triton's interpreter (an opaque custom op
there; on a GPU a triton_op whose kernels inductor launches itself, and CUDA graphs capture:
tools/gpu_check.sh covers that). Each case compiles two graphs (prefill, decode): ~1 min on CPU.
"""

from __future__ import annotations

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def recording_inductor(graphs: list):
    """An inductor backend that keeps the code of every graph dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    return backend


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_static_cache_compiled_forward_gives_the_eager_tokens(backend):
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=512, num_hidden_layers=2, siaf_backend=backend)
    model = PanGuPiForCausalLM(config).eval()
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(prompt, **kwargs)
        graphs: list[str] = []
        model.forward = torch.compile(model.forward, fullgraph=True, backend=recording_inductor(graphs))
        compiled = model.generate(prompt, **kwargs)
    assert torch.equal(compiled, eager), (compiled, eager)
    assert len(graphs) >= 2  # prefill and decode were both compiled (fullgraph: no break in either)
    uses_op = ["siaf_triton_fwd" in code for code in graphs]
    assert all(uses_op) if backend == "triton" else not any(uses_op)
