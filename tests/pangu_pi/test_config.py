import pytest

from pangu_pi import ConfigError, PanGuPiConfig
from pangu_pi.parameters import count_parameters


def test_presets_match_the_paper_shapes():
    one = PanGuPiConfig.from_preset("pangu-pi-1b")
    seven = PanGuPiConfig.from_preset("pangu-pi-7b")
    assert (one.num_hidden_layers, one.hidden_size, one.num_attention_heads, one.vocab_size) == (12, 2048, 16, 100883)
    assert (seven.num_hidden_layers, seven.hidden_size, seven.num_attention_heads, seven.vocab_size) == (
        29,
        4096,
        32,
        100883,
    )
    assert seven.siaf_terms == 2 and seven.shortcut_ratio == 32 and seven.shortcut_count == 1


@pytest.mark.parametrize("preset, low, high", [("pangu-pi-1b", 0.9e9, 1.15e9), ("pangu-pi-7b", 6.5e9, 7.0e9)])
def test_preset_parameter_counts(preset, low, high):
    assert low <= count_parameters(PanGuPiConfig.from_preset(preset))["total"] <= high


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'pangu-pi-7b'"):
        PanGuPiConfig.from_preset("pangu-pi-7")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "not divisible"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(siaf_activation="swish"), "siaf_activation"),
        (dict(siaf_terms=0), "siaf_terms"),
        (dict(siaf_init="identity"), "siaf_learn_weight"),
        (dict(shortcut_ratio=1000), "bottleneck"),
    ],
)
def test_impossible_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PanGuPiConfig.from_preset("tiny", **overrides)


def test_config_round_trips_through_json(tmp_path):
    config = PanGuPiConfig.from_preset("tiny", siaf_terms=3, siaf_param_shape="scalar", shortcut_count=2)
    config.save_pretrained(tmp_path)
    again = PanGuPiConfig.from_pretrained(tmp_path)
    for field in ("siaf_terms", "siaf_param_shape", "shortcut_count", "head_dim", "num_key_value_heads", "rope_theta"):
        assert getattr(again, field) == getattr(config, field)
