"""`--set`: both forms, in every command that takes it (pangu_pi.overrides)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pangu_pi.cli import main as cli
from pangu_pi.config import ConfigError
from pangu_pi.overrides import add_set_argument, apply_overrides, deep_merge, yaml_text

PAIRS = ["optim.lr=0.001", "model.hidden_size=64", "data.datasets=[{path: d, weight: 2}]"]


@pytest.mark.parametrize("argv", [
    ["--set", *PAIRS],
    [arg for pair in PAIRS for arg in ("--set", pair)],
    ["--set", PAIRS[0], PAIRS[1], "--set", PAIRS[2]],
])
def test_both_forms_give_the_same_pairs_in_order(argv):
    parser = argparse.ArgumentParser()
    add_set_argument(parser, "override")
    parser.add_argument("--out")
    args = parser.parse_args([*argv, "--out", "o"])
    assert args.set == PAIRS and args.out == "o"
    assert apply_overrides({"optim": {"lr": 1.0, "wd": 0.1}}, args.set) == {
        "optim": {"lr": 0.001, "wd": 0.1}, "model": {"hidden_size": 64},
        "data": {"datasets": [{"path": "d", "weight": 2}]},
    }


def test_a_later_pair_wins_and_sections_merge():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert apply_overrides({}, ["a.b=1", "a.b=2"]) == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        apply_overrides({}, ["a.b"])


def test_yaml_text_keeps_the_order_and_the_text():
    assert yaml_text({"z": 1, "a": "债券"}) == "z: 1\na: 债券\n"


@pytest.mark.parametrize("form", ["one flag", "repeated"])
def test_info_takes_both_forms(form, capsys):
    pairs = ["model.hidden_size=64", "num_hidden_layers=2"]
    argv = ["--set", *pairs] if form == "one flag" else ["--set", pairs[0], "--set", pairs[1]]
    assert cli(["info", "--preset", "tiny", *argv, "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2


def test_init_takes_both_forms(tokenizer_dir, tmp_path):
    one = tmp_path / "one"
    repeated = tmp_path / "repeated"
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(one),
                "--set", "siaf_backend=reference", "num_hidden_layers=1", "model.hidden_size=64"]) == 0
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(repeated), "--set", "siaf_backend=reference",
                "--set", "num_hidden_layers=1", "--set", "model.hidden_size=64"]) == 0
    saved = [json.loads((d / "config.json").read_text()) for d in (one, repeated)]
    assert [(c["num_hidden_layers"], c["hidden_size"]) for c in saved] == [(1, 64), (1, 64)]
    assert (one / "model.safetensors").read_bytes() == (repeated / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def finetune_inputs(tokenizer_dir, tmp_path_factory):
    """A base checkpoint and a chat file, so that a fine-tuning config passes its path checks."""
    root = tmp_path_factory.mktemp("ft-inputs")
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(root / "base"),
                "--set", "siaf_backend=reference", "num_hidden_layers=1"]) == 0
    chat = root / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return [f"model.init_from={root / 'base'}", f"data.datasets=[{{path: {chat}, weight: 1.0}}]",
            "finetune.mode=lora"]


@pytest.mark.parametrize("recipe, config_file", [("pretrain", "tiny.yaml"), ("finetune", "yunshan_finetune_tiny.yaml")])
@pytest.mark.parametrize("form", ["one flag", "repeated"])
def test_pretrain_and_finetune_take_both_forms(recipe, config_file, form, request, tmp_path):
    from pangu_pi.training.command import DESCRIPTIONS, run_config_from_args, run_parser

    extra = request.getfixturevalue("finetune_inputs") if recipe == "finetune" else []
    pairs = ["optim.lr=0.002", "train.max_steps=7", "model.max_position_embeddings=1024", *extra]
    flags = ["--set", *pairs] if form == "one flag" else [arg for pair in pairs for arg in ("--set", pair)]
    config_path = Path(__file__).resolve().parents[2] / "configs" / config_file
    args = run_parser(f"pangu-pi {recipe}", DESCRIPTIONS[recipe]).parse_args(
        ["--config", str(config_path), *flags, "--out", str(tmp_path / "run")])
    assert args.set == pairs
    config = run_config_from_args(args, recipe)
    assert config.optim.lr == 0.002 and config.train.max_steps == 7
    assert config.model["max_position_embeddings"] == 1024
    if extra:
        assert config.finetune.mode == "lora"
