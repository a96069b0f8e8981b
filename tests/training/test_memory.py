"""Parameter counts from the config and the per-GPU memory estimate used in docs/training.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.training.config import load_config
from pangu_pi.training.memory import GIB, count_parameters, estimate_memory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"siaf_param_shape": "scalar", "siaf_learn_weight": True, "siaf_terms": 3},
        {"tie_word_embeddings": True, "shortcut_count": 2},
        {"num_key_value_heads": 4, "shortcut_count": 0},
    ],
)
def test_count_matches_the_model(overrides):
    config = PanGuPiConfig.from_preset("tiny", vocab_size=700, siaf_backend="reference", **overrides)
    model = PanGuPiForCausalLM(config)
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())


def test_presets_have_the_paper_sizes():
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-7b"))["total"] / 1e9 == pytest.approx(6.73, abs=0.01)
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-1b"))["total"] / 1e9 == pytest.approx(1.03, abs=0.01)


def test_zero_stages_partition_more_and_checkpointing_saves_activations():
    config = load_config(CONFIGS / "pangu-pi-7b.yaml")
    by_stage = {}
    for stage in (1, 2, 3):
        config.train.zero_stage = stage
        by_stage[stage] = estimate_memory(config, 64)
    assert by_stage[1].gradients > by_stage[2].gradients == by_stage[3].gradients
    assert by_stage[2].weights > by_stage[3].weights
    assert by_stage[1].optimizer == by_stage[2].optimizer == pytest.approx(12 * by_stage[1].parameters / 64)
    config.train.zero_stage = 2
    with_ckpt = estimate_memory(config, 64).activations
    config.train.activation_checkpointing = False
    assert estimate_memory(config, 64).activations > 5 * with_ckpt


def test_the_7b_recipe_fits_an_80gb_gpu_on_64():
    est = estimate_memory(load_config(CONFIGS / "pangu-pi-7b.yaml"), 64)
    assert 15 * GIB < est.total < 70 * GIB
    assert "total" in est.table()
