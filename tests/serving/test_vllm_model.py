"""The vLLM model's pieces that can be checked without an engine: plugin registration, the SIAF op,
weight-name mapping and tensor-parallel sharding of the SIAF coefficients."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

from pangu_pi import PanGuPiConfig
from pangu_pi.kernels.reference import siaf_and_mul_reference


def test_plugin_is_an_entry_point_and_registers_lazily():
    points = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert points.get("pangu_pi") == "pangu_pi.serving.plugin:register"
    probe = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        "from transformers import AutoConfig\n"
        "assert 'PanGuPiForCausalLM' in ModelRegistry.get_supported_archs()\n"
        "assert 'pangu_pi.serving.vllm_model' not in sys.modules, 'registration must not import the model'\n"
        "assert AutoConfig.for_model('pangu_pi').model_type == 'pangu_pi'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.fixture(scope="module")
def vllm_model():
    from vllm.config import VllmConfig, set_current_vllm_config

    import pangu_pi.serving.vllm_model as module

    with set_current_vllm_config(VllmConfig()):
        yield module


def make_op(module, tp_size=1, **overrides):
    from vllm.config import VllmConfig, set_current_vllm_config

    config = PanGuPiConfig.from_preset("tiny", vocab_size=512, **overrides)
    with set_current_vllm_config(VllmConfig()):
        op = module.SIAFAndMul(config, tp_size)
    with torch.no_grad():
        for p in (op.scale, op.shift, op.coef):
            if p is not None:
                p.copy_(torch.randn(p.shape))
    return op


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"siaf_param_shape": "scalar", "siaf_learn_weight": True, "siaf_terms": 3},
        {"siaf_activation": "gelu", "siaf_learn_weight": True},
    ],
)
def test_siaf_op_on_concatenated_gate_up(vllm_model, overrides):
    op = make_op(vllm_model, **overrides)
    width = 352
    gate_up = torch.randn(5, 2 * width)
    expected = siaf_and_mul_reference(
        gate_up[:, :width], gate_up[:, width:], op.scale, op.shift, op.coef, op.activation
    )
    torch.testing.assert_close(op(gate_up), expected)
    torch.testing.assert_close(op.forward_native(gate_up), expected)


def test_per_channel_siaf_coefficients_shard_with_the_ffn_channels(vllm_model, monkeypatch):
    op = make_op(vllm_model, tp_size=2)
    assert op.scale.shape == (2, 176)
    full = torch.arange(2 * 352, dtype=torch.float32).view(2, 352)
    monkeypatch.setattr(vllm_model, "get_tensor_model_parallel_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(vllm_model, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        op.scale.weight_loader(op.scale, full)
        torch.testing.assert_close(op.scale.data, full[:, rank * 176 : (rank + 1) * 176])
    with pytest.raises(ValueError, match="per-channel"):
        op.scale.weight_loader(op.scale, torch.zeros(2, 100))


def test_scalar_siaf_coefficients_are_replicated(vllm_model):
    op = make_op(vllm_model, tp_size=4, siaf_param_shape="scalar")
    assert op.scale.shape == (2,) and not hasattr(op.scale, "weight_loader")


def test_hf_weight_names_map_onto_the_stacked_layers(vllm_model):
    mapper = vllm_model.PanGuPiForCausalLM.hf_to_vllm_mapper
    cases = {
        "model.layers.0.self_attn.q_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", "q"),
        "model.layers.0.self_attn.v_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", "v"),
        "model.layers.3.mlp.gate_proj.weight": ("model.layers.3.mlp.gate_up_proj.weight", 0),
        "model.layers.3.mlp.up_proj.weight": ("model.layers.3.mlp.gate_up_proj.weight", 1),
        "model.layers.1.mlp.siaf.scale": ("model.layers.1.mlp.siaf.scale", None),
        "model.layers.1.augmented_shortcuts.0.expand.weight": (
            "model.layers.1.augmented_shortcuts.0.expand.weight",
            None,
        ),
    }
    for hf_name, expected in cases.items():
        assert mapper._map_name_with_shard(hf_name) == expected
    assert vllm_model.PanGuPiForCausalLM.packed_modules_mapping == {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and the CUDA build of vLLM")
def test_fused_siaf_op_matches_the_reference_on_cuda(vllm_model):
    op = make_op(vllm_model, siaf_learn_weight=True).cuda()
    gate_up = torch.randn(7, 2 * 352, device="cuda")
    torch.testing.assert_close(op.forward_cuda(gate_up), op.forward_native(gate_up), rtol=1e-5, atol=1e-5)
