"""The run config: YAML + overrides into checked dataclasses, and the batch split."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pangu_pi.config import ConfigError
from pangu_pi.training.config import (
    BatchConfig,
    build_config,
    dump_yaml,
    load_config,
    parse_override,
    resolve_batch,
    resolved_dict,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_overrides_are_typed():
    config = build_config({"optim": {"lr": "3e-4"}}, ["train.max_steps=50", "optim.betas=[0.8, 0.99]",
                                                        "train.activation_checkpointing=true", "model.hidden_size=64"])
    assert config.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; we read a number
    assert config.train.max_steps == 50
    assert config.optim.betas == [0.8, 0.99]
    assert config.train.activation_checkpointing is True
    assert config.model == {"preset": "tiny", "hidden_size": 64}
    assert config.model_config(vocab_size=500).vocab_size == 500
    assert config.model_config(vocab_size=500).hidden_size == 64


@pytest.mark.parametrize(
    ("values", "overrides", "suggestion"),
    [
        ({"optim": {"lrr": 1e-3}}, [], "optim.lr"),
        ({"trian": {"max_steps": 3}}, [], "train"),
        ({}, ["checkpoint.save_evry=5"], "checkpoint.save_every"),
        ({"model": {"hidden_sise": 64}}, [], "model.hidden_size"),
        ({"train": {"warmup_steps": 10}}, [], "schedule.warmup_steps"),  # right key, wrong section
    ],
)
def test_unknown_key_names_the_nearest_valid_one(values, overrides, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion!r}"):
        build_config(values, overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=many", "must be an integer"),
        ("train.zero_stage=4", "must be 1, 2 or 3"),
        ("train.precision=fp16", "bf16 or fp32"),
        ("schedule.kind=linear", "cosine, wsd or constant"),
        ("data.seq_len=4096", "max_position_embeddings"),
        ("model.preset=huge", "unknown preset"),
        ("deepspeed.train_batch_size=8", "set batch"),
        ("data.datasets=[{path: x, weight: -1}]", "positive number"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [override])


def test_override_parsing():
    assert parse_override("a.b.c=7") == {"a": {"b": {"c": 7}}}
    assert parse_override("out=null") == {"out": None}
    expected = {"data": {"datasets": [{"path": "d", "weight": 2}]}}
    assert parse_override("data.datasets=[{path: d, weight: 2}]") == expected
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("optim.lr")


@pytest.mark.parametrize(
    ("g", "m", "a", "world", "want"),
    [
        (64, 4, None, 2, (64, 4, 8)),
        (64, None, 4, 2, (64, 8, 4)),
        (None, 4, 2, 2, (16, 4, 2)),
        (None, 4, None, 3, (12, 4, 1)),
        (24, 4, 3, 2, (24, 4, 3)),
    ],
)
def test_batch_split_is_derived(g, m, a, world, want):
    split = resolve_batch(BatchConfig(g, m, a), world)
    assert (split.global_batch_size, split.micro_batch_size, split.grad_accum) == want
    assert split.global_batch_size == split.micro_batch_size * split.grad_accum * world


@pytest.mark.parametrize(
    ("g", "m", "a", "world", "message"),
    [
        (64, 4, 4, 2, "≠ micro_batch_size 4 × grad_accum 4 × 2 processes = 32"),
        (30, 4, None, 2, "not divisible by micro_batch_size 4 × 2 processes"),
        (30, None, 4, 2, "not divisible by grad_accum 4 × 2 processes"),
        (64, None, None, 2, "set batch.micro_batch_size"),
        (64, 0, None, 2, "at least 1"),
    ],
)
def test_impossible_batch_split_is_refused(g, m, a, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_batch(BatchConfig(g, m, a), world)


@pytest.mark.parametrize("name", ["tiny.yaml", "pangu-pi-1b.yaml", "pangu-pi-7b.yaml"])
def test_shipped_recipes_load(name):
    config = load_config(CONFIGS / name)
    assert config.optim.betas == [0.9, 0.95]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, capsys):
    # The folders they name live on the training cluster; keys and values are checked here.
    config = load_config(path, check_paths=False)
    assert config.recipe == ("finetune" if "finetune" in yaml.safe_load(path.read_text()) else "pretrain")
    assert "older fine-tuning layout" not in capsys.readouterr().err  # shipped files use the current layout


def _chat_config(tmp_path: Path) -> dict:
    from pangu_pi import PanGuPiConfig

    base = tmp_path / "base"
    PanGuPiConfig.from_preset("tiny", vocab_size=600).save_pretrained(base)
    return {"model": {"init_from": str(base)}, "data": {"datasets": [str(tmp_path / "chat.jsonl")], "seq_len": 64},
            "finetune": {"mode": "lora", "lora": {"r": 4}}}


@pytest.mark.parametrize(
    ("recipe", "override", "suggestion"),
    [
        ("pretrain", "optim.lrr=1e-3", "optim.lr"),
        ("finetune", "optim.lrr=1e-3", "optim.lr"),
        ("pretrain", "checkpoint.save_evry=5", "checkpoint.save_every"),
        ("finetune", "checkpoint.save_evry=5", "checkpoint.save_every"),
        ("finetune", "finetune.lora.rank=4", "finetune.lora.r"),
        ("finetune", "finetune.mdoe=full", "finetune.mode"),
        ("finetune", "data.seqlen=64", "data.seq_len"),
    ],
)
def test_one_loader_for_every_recipe_names_the_nearest_key(tmp_path, recipe, override, suggestion):
    values = _chat_config(tmp_path) if recipe == "finetune" else {}
    with pytest.raises(ConfigError, match=f"unknown config key .*; did you mean {suggestion!r}"):
        build_config(values, [override], recipe=recipe)


def test_finetune_config_shares_the_sections_and_takes_its_own_defaults(tmp_path):
    config = build_config(_chat_config(tmp_path), ["train.max_steps=7", "batch.micro_batch_size=2"], recipe="finetune")
    assert config.recipe == "finetune" and config.finetune.mode == "lora" and config.finetune.lora.r == 4
    assert config.train.max_steps == 7 and config.batch.micro_batch_size == 2
    assert config.optim.lr == pytest.approx(2e-5) and config.optim.weight_decay == 0.0  # fine-tuning defaults
    assert config.train.precision == "fp32" and config.eval.every == 0
    assert config.model_config().vocab_size == 600  # the shape comes from model.init_from
    # The resolved config reloads as the same recipe, without being told.
    dump_yaml(resolved_dict(config), tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.recipe == "finetune" and resolved_dict(again) == resolved_dict(config)
    with pytest.raises(ConfigError, match="finetune.mode must be full, lora or dpo"):
        build_config(_chat_config(tmp_path), ["finetune.mode=qlora"], recipe="finetune")
    with pytest.raises(ConfigError, match="train.zero_stage 1 or 2"):
        build_config(_chat_config(tmp_path), ["train.zero_stage=3"], recipe="finetune")
    with pytest.raises(ConfigError, match="pangu-pi finetune"):
        build_config(_chat_config(tmp_path), recipe="pretrain")


def test_old_finetune_layout_loads_with_a_note_of_what_moved(tmp_path, capsys):
    new = _chat_config(tmp_path)
    old = {"model": new["model"]["init_from"], "datasets": new["data"]["datasets"], "seq_len": 64, "mode": "lora",
           "lora": {"r": 4}, "precision": "fp32", "max_steps": 5, "log": {"every": 2}}
    config = build_config(old, ["zero_stage=1"])
    assert config.recipe == "finetune"
    err = capsys.readouterr().err
    for move in ("model → model.init_from", "seq_len → data.seq_len", "mode → finetune.mode", "lora → finetune.lora",
                 "precision → train.precision", "zero_stage → train.zero_stage", "log.every → train.log_every"):
        assert move in err
    assert config.model["init_from"] == new["model"]["init_from"] and config.data.seq_len == 64
    assert config.finetune.lora.r == 4 and config.train.zero_stage == 1 and config.train.log_every == 2
    assert config.train.max_steps == 5


@pytest.mark.parametrize("name", ["pangu-pi-1b.yaml", "pangu-pi-7b.yaml"])
def test_paper_recipes(name):
    config = load_config(CONFIGS / name)
    split = resolve_batch(config.batch, 64)
    tokens = split.global_batch_size * config.data.seq_len
    assert 3.9e6 <= tokens <= 4.3e6  # about 4M tokens a step
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.schedule.warmup_steps == 4000
    assert config.schedule.kind == "cosine"
    assert config.train.precision == "bf16"


def test_resolved_config_reloads_to_the_same(tmp_path):
    config = build_config({"batch": {"global_batch_size": 32, "micro_batch_size": 4}}, ["optim.lr=2e-4"])
    resolved = resolved_dict(config, resolve_batch(config.batch, 2), vocab_size=1000)
    assert resolved["batch"] == {"global_batch_size": 32, "micro_batch_size": 4, "grad_accum": 4}
    dump_yaml(resolved, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert resolved_dict(again) == resolved
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]["vocab_size"] == 1000


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_run_folder_prefers_the_flag_then_the_config_then_the_config_name():
    from pangu_pi.training.config import run_folder

    assert run_folder("configs/tiny.yaml", "/tmp/x", "runs/y") == "/tmp/x"
    assert run_folder("configs/tiny.yaml", None, "runs/y") == "runs/y"
    assert run_folder("configs/tiny.yaml", None, None) == str(Path("runs") / "tiny")


def test_set_means_the_same_in_info_and_init():
    from pangu_pi.cli import UserError
    from pangu_pi.commands import parse_overrides

    # The run config's model keys, or bare model fields; values read as YAML as everywhere else.
    assert parse_overrides(["model.hidden_size=64", "num_hidden_layers=2", "siaf_backend=reference"]) == {
        "hidden_size": 64, "num_hidden_layers": 2, "siaf_backend": "reference"}
    assert build_config({}, ["model.hidden_size=64"]).model["hidden_size"] == 64
    with pytest.raises(UserError, match="did you mean 'model.hidden_size'"):
        parse_overrides(["model.hiden_size=64"])
