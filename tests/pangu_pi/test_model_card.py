"""The model card (README.md) of a checkpoint states the run's own figures: parameter count, config
fields, steps, tokens, data mixture and losses; `pangu-pi eval` adds its scores to it."""

from __future__ import annotations

import json

import torch

from pangu_pi.cli import main as cli
from pangu_pi.model_card import CONFIG_FIELDS, read_card


def _card_text(folder) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def _check_model_facts(folder) -> dict:
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401

    card = read_card(folder)
    assert card["library_name"] == "transformers" and "custom_code" in card["tags"]
    facts = card["pangu_pi"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert f"**{facts['parameters']:,}**" in _card_text(folder)
    saved = json.loads((folder / "config.json").read_text())
    for field in CONFIG_FIELDS:
        assert facts["config"][field] == saved[field], field
        assert f"| `{field}` |" in _card_text(folder)
    assert facts["remote_code"] is True and "trust_remote_code=True" in _card_text(folder)
    return facts


def test_card_of_an_export_states_the_pretraining_run(pretrained_export):
    from pangu_pi.training.metrics import read_metrics

    run, export = pretrained_export
    facts = _check_model_facts(export)
    rows = read_metrics(run / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r]
    state = json.loads((run / "checkpoints" / "step_4" / "trainer" / "state.json").read_text())
    assert facts["run"]["kind"] == "pretraining" and facts["run"]["steps"] == 4 == state["step"]
    assert facts["run"]["tokens_seen"] == state["tokens_seen"] == 4 * 4 * 32
    assert facts["run"]["final_val_loss"] == val[-1]["val_loss"] and facts["run"]["final_val_loss_step"] == 4
    assert facts["run"]["final_train_loss"] == train[-1]["loss"]
    assert facts["run"]["data_mixture"] == [{"path": "embedded default corpus", "weight": 1.0}]
    text = _card_text(export)
    assert f"final validation loss: {val[-1]['val_loss']:.4f} (step 4)" in text
    assert f"tokens seen: {state['tokens_seen']:,}" in text
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    assert facts["tokenizer"]["vocab_size"] == len(tokenizer["model"]["vocab"]) + sum(
        1 for t in tokenizer["added_tokens"] if t["content"] not in tokenizer["model"]["vocab"])
    assert facts["tokenizer"]["chat_template"] is True and facts["tokenizer"]["turn_end"]["token"] == "<|im_end|>"
    assert card_name(export) == "hf"  # the export's own name, not the temporary folder it was written in


def card_name(folder) -> str:
    return read_card(folder)["pangu_pi"]["name"]


def test_card_of_a_finetuned_model_states_the_finetuning_run(checkpoints):
    folder = checkpoints["finetuned"]
    facts = _check_model_facts(folder)
    from pangu_pi.training.metrics import read_metrics

    summary = json.loads((folder.parent / "finetune_summary.json").read_text())
    rows = read_metrics(folder.parent / "metrics.jsonl")
    run = facts["run"]
    assert run["kind"] == "fine-tuning (full)" and run["base_model"] == str(checkpoints["init"])
    assert run["steps"] == summary["steps"] == 3
    assert run["final_train_loss"] == summary["final_loss"]
    logged = [r["tokens"] for r in rows if "tokens" in r][-1]
    assert run["tokens_seen"] == 3 * summary["batch"]["global_batch_size"] * 64 == logged
    val = [r for r in rows if "val_loss" in r]
    assert val and run["final_val_loss"] == val[-1]["val_loss"]
    assert f"final validation loss: {val[-1]['val_loss']:.4f}" in _card_text(folder)
    assert run["data_mixture"][0]["path"].endswith("chat.jsonl") and run["data_mixture"][0]["weight"] == 1.0
    assert facts["tokenizer"]["chat_template"] is True  # the run's tokenizer, saved beside the weights after them


def test_eval_adds_its_scores_to_the_card(pretrained_export, tmp_path):
    import shutil

    _, export = pretrained_export
    folder = tmp_path / "scored"
    shutil.copytree(export, folder)
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"question": f"{a} plus {a} is", "choices": [str(2 * a), str(2 * a + 1)],
                                        "answer": 0}) + "\n" for a in range(6)))
    results = tmp_path / "results.json"
    assert cli(["eval", str(folder), "--task", str(task), "--out", str(results), "--device", "cpu"]) == 0
    scores = json.loads(results.read_text())["tasks"]["mc"]
    card = read_card(folder)
    assert card["pangu_pi"]["evaluation"]["tasks"]["mc"]["acc"] == scores["acc"]
    index = card["model-index"][0]["results"][0]
    assert index["dataset"]["name"] == "mc" and {"type": "acc", "value": scores["acc"]} in index["metrics"]
    assert f"| mc | 6 | {scores['acc']:.4f} |" in _card_text(folder)
    # The run facts survive the rewrite.
    assert card["pangu_pi"]["run"] == read_card(export)["pangu_pi"]["run"]
