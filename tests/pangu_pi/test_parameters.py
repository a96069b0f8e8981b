"""The parameter count by formula (pangu_pi.parameters) against the model it describes."""

from __future__ import annotations

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.parameters import count_parameters


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"siaf_param_shape": "scalar", "siaf_learn_weight": True, "siaf_terms": 3},
        {"tie_word_embeddings": True, "shortcut_count": 2, "shortcut_ratio": 16},
        {"num_key_value_heads": 4, "shortcut_count": 0},
        {"head_dim": 48, "intermediate_size": 200, "num_hidden_layers": 3},
    ],
)
def test_count_matches_the_model(overrides):
    config = PanGuPiConfig.from_preset("tiny", vocab_size=700, siaf_backend="reference", **overrides)
    with torch.device("meta"):
        model = PanGuPiForCausalLM(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_preset_sizes_are_the_papers():
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-7b"))["total"] / 1e9 == pytest.approx(6.73, abs=0.01)
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-1b"))["total"] / 1e9 == pytest.approx(1.03, abs=0.01)
