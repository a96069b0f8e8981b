"""RoPE scaling through transformers' own RoPE functions: every LLaMA variant builds, each changes the
logits where it should (and only there), converted LLaMAs keep their scaling and their logits, and a
variant neither transformers nor vLLM builds is refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pangu_pi import ConfigError, PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.cli import main as cli

WINDOW = 16  # max_position_embeddings of the test models: the window they were "trained" for


def model_with(rope: dict | None, seed: int = 0) -> PanGuPiForCausalLM:
    torch.manual_seed(seed)
    config = PanGuPiConfig.from_preset("tiny", siaf_backend="reference", max_position_embeddings=WINDOW,
                                       rope_theta=500.0, rope_parameters=rope)
    model = PanGuPiForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for shortcut in layer.augmented_shortcuts:
                shortcut.expand.weight.normal_(0, 0.02)
    return model


def logits(model, length: int) -> torch.Tensor:
    ids = (torch.arange(length) * 37 % 8000 + 5).unsqueeze(0)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0]


SCALED = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": WINDOW},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [4.0] * 16,
                 "original_max_position_embeddings": WINDOW},
}


@pytest.mark.parametrize("kind", sorted(SCALED))
def test_every_variant_survives_a_save_and_load(kind, tmp_path):
    model = model_with(SCALED[kind])
    assert model.config.rope_parameters["rope_type"] == kind
    model.save_pretrained(tmp_path, model_card=False)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == kind
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, 3 * WINDOW), logits(loaded, 3 * WINDOW))


def test_linear_scaling_changes_with_the_factor():
    plain = logits(model_with(None), WINDOW)
    assert torch.equal(logits(model_with({"rope_type": "linear", "factor": 1.0}), WINDOW), plain)
    two = logits(model_with(SCALED["linear"]), WINDOW)
    four = logits(model_with({"rope_type": "linear", "factor": 4.0}), WINDOW)
    assert torch.equal(two[0], plain[0])  # position 0 has no rotation to scale
    assert (two[1:] - plain[1:]).abs().amax(-1).min() > 1e-4  # every later position moves
    assert (four[1:] - two[1:]).abs().amax(-1).min() > 1e-4


def test_dynamic_scaling_is_the_plain_rope_inside_the_window_and_not_beyond():
    plain, dynamic = model_with(None), model_with(SCALED["dynamic"])
    torch.testing.assert_close(logits(dynamic, WINDOW), logits(plain, WINDOW), rtol=0, atol=0)
    long_plain, long_dynamic = logits(plain, 3 * WINDOW), logits(dynamic, 3 * WINDOW)
    assert (long_dynamic[1:] - long_plain[1:]).abs().amax(-1).min() > 1e-4
    # A shorter sequence afterwards gets the trained frequencies back (transformers resets them for
    # sequences shorter than the window).
    torch.testing.assert_close(logits(dynamic, WINDOW - 2), logits(plain, WINDOW - 2), rtol=0, atol=0)


def test_yarn_and_llama3_change_the_logits_and_differ_by_factor():
    plain = logits(model_with(None), 2 * WINDOW)
    yarn4 = logits(model_with(SCALED["yarn"]), 2 * WINDOW)
    yarn8 = logits(model_with({**SCALED["yarn"], "factor": 8.0}), 2 * WINDOW)
    llama3 = logits(model_with(SCALED["llama3"]), 2 * WINDOW)
    for scaled in (yarn4, yarn8, llama3):
        assert (scaled - plain).abs().max() > 1e-3
    assert (yarn8 - yarn4).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "llama3"])
def test_converted_llama_keeps_its_scaling_and_its_logits(kind, tmp_path):
    rope = {**SCALED[kind], "rope_theta": 500.0}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=WINDOW, rope_parameters=rope)).eval()
    llama.save_pretrained(tmp_path / "llama")
    assert cli(["convert-llama", str(tmp_path / "llama"), str(tmp_path / "pangu")]) == 0
    pangu = AutoModelForCausalLM.from_pretrained(tmp_path / "pangu").eval()
    assert isinstance(pangu, PanGuPiForCausalLM)
    assert pangu.config.rope_parameters["rope_type"] == kind
    assert pangu.config.rope_parameters["factor"] == rope["factor"]
    ids = torch.randint(0, 512, (1, 3 * WINDOW))  # past the original window: the scaling is in use
    with torch.no_grad():
        assert (pangu(ids).logits - llama(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "ntk", "factor": 2.0}, "'ntk' is not supported"),
        ({"rope_type": "dynamik", "factor": 2.0}, "did you mean 'dynamic'"),
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
        ({"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ],
)
def test_unsupported_or_incomplete_scaling_is_refused(rope, message):
    with pytest.raises(ConfigError, match=message):
        PanGuPiConfig.from_preset("tiny", rope_parameters=rope)


def test_legacy_rope_scaling_key_is_read():
    config = PanGuPiConfig.from_preset("tiny", rope_scaling={"type": "linear", "factor": 3.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}


def test_convert_llama_refuses_a_variant_it_cannot_build(tmp_path, capsys):
    src = tmp_path / "llama"
    src.mkdir()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2).to_dict()
    config["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(config))
    assert cli(["convert-llama", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'proportional'" in err and "supported" in err and len(err.splitlines()) == 1


def test_init_takes_the_scaling_from_the_command_line(tokenizer_dir, tmp_path):
    out = tmp_path / "long"
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--set", "max_position_embeddings=2048",
                "model.rope_parameters.rope_type=yarn", "model.rope_parameters.factor=4.0",
                "model.rope_parameters.original_max_position_embeddings=512"]) == 0
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}
