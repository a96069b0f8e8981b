"""The model card (`README.md`, the Hub's format: YAML front matter, then Markdown) of a checkpoint.

Written by `PanGuPiPreTrainedModel.save_pretrained`, so every checkpoint pangu-pi writes has one:
architecture and parameter count, the PanGu-π config fields, tokenizer and chat-template facts, what
the run that made the weights knows (steps, tokens seen, data mixture, final losses) and how to load
and serve the folder. `pangu-pi eval` adds its results (`add_evaluation`).

The front matter keeps the facts as data under `pangu_pi:` (and the scores under `model-index:`, the
Hub's field for evaluation results), so the card can be rewritten from itself when results arrive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import run_layout
from .parameters import count_parameters

CARD_FILE = "README.md"
CHAT_END = "<|im_end|>"

# The PanGu-π config fields a reader needs to rebuild or compare the model, in the card's order.
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
    "siaf_terms",
    "siaf_activation",
    "siaf_param_shape",
    "siaf_learn_weight",
    "siaf_init",
    "shortcut_count",
    "shortcut_ratio",
    "shortcut_activation",
)


# --- what the folder and its run know ---------------------------------------------------------------


def tokenizer_card(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    """The card's account of the tokenizer in `folder` (pangu_pi.tokenizer.tokenizer_facts, with the
    special tokens and chat template tokenizer_config.json names); None if it has none."""
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        return None
    from .tokenizer import tokenizer_facts

    folder = Path(folder)
    read = tokenizer_facts(folder)
    tok = read.tokenizer
    settings = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = settings.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            special[key] = {"token": value, "id": tok.token_to_id(value)}
    facts: dict[str, Any] = {
        "vocab_size": read.vocab_size,
        "kind": type(tok.model).__name__,
        "special_tokens": special,
        "chat_template": bool(template),
    }
    if template:
        facts["chat_turns"] = "ChatML (<|im_start|>ROLE ... <|im_end|>)" if "<|im_start|>" in template else "custom"
        if tok.token_to_id(CHAT_END) is not None:
            facts["turn_end"] = {"token": CHAT_END, "id": tok.token_to_id(CHAT_END)}
    if (folder / "extension.json").is_file():
        report = json.loads((folder / "extension.json").read_text(encoding="utf-8"))
        facts["extended_from"] = report.get("base_size")
    return facts


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}


def _metrics(run_dir: Path, up_to_step: int | None = None) -> list[dict]:
    rows = []
    path = run_dir / run_layout.METRICS
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if up_to_step is None or row.get("step", 0) <= up_to_step:
                rows.append(row)
    return rows


def _mixture(datasets: list) -> list[dict]:
    out = []
    for entry in datasets or []:
        if isinstance(entry, dict):
            out.append({"path": str(entry.get("path")), "weight": float(entry.get("weight", 1.0))})
        else:
            out.append({"path": str(entry), "weight": 1.0})
    return out


def _losses(rows: list[dict]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    train = [r for r in rows if r.get("loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    if train:
        facts["final_train_loss"] = float(train[-1]["loss"])
        facts["final_train_loss_step"] = int(train[-1]["step"])
    if val:
        facts["final_val_loss"] = float(val[-1]["val_loss"])
        facts["final_val_loss_step"] = int(val[-1]["step"])
    return facts


def run_facts(run_dir: str | os.PathLike, state: dict | None = None) -> dict[str, Any] | None:
    """What a training run folder (`pangu-pi pretrain` or `pangu-pi finetune`) knows, up to the step of
    `state` (a checkpoint's trainer/state.json) or to its last logged step. None if it is no run folder."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / run_layout.RUN_CONFIG)
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("data"), dict):
        return None
    state = state or {}
    step = int(state["step"]) if state.get("step") else None
    rows = _metrics(run_dir, step)
    train = [r for r in rows if r.get("loss") is not None]
    finetune = config.get("finetune")
    data = config["data"]
    mixture = _mixture(data.get("datasets"))
    if not mixture and not finetune:
        mixture = [{"path": "embedded default corpus", "weight": 1.0}]
    facts: dict[str, Any] = {
        "kind": f"fine-tuning ({finetune.get('mode', 'full')})" if isinstance(finetune, dict) else "pretraining",
        "run": str(run_dir),
        "steps": step or (int(train[-1]["step"]) if train else None),
        "tokens_seen": state.get("tokens_seen") or (train[-1].get("tokens") if train else None),
        "data_mixture": mixture,
        "seq_len": data.get("seq_len"),
        "global_batch_size": (config.get("batch") or {}).get("global_batch_size"),
        "precision": (config.get("train") or {}).get("precision"),
        "base_model": config["model"].get("init_from"),
    }
    facts.update(_losses(rows))
    return {k: v for k, v in facts.items() if v is not None}


def pretraining_facts(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What a training checkpoint (RUN/checkpoints/step_N) knows about its run, up to its step."""
    checkpoint = Path(checkpoint)
    state = {}
    if (checkpoint / run_layout.TRAINER_STATE).is_file():
        state = json.loads((checkpoint / run_layout.TRAINER_STATE).read_text())
    # The run folder's metrics hold the losses; the checkpoint's own config is the one it ran with.
    facts = run_facts(run_layout.run_of(checkpoint), state) or {}
    own = _read_yaml(checkpoint / run_layout.RUN_CONFIG)
    if own and not facts:
        facts = {"kind": "pretraining", "steps": state.get("step"), "tokens_seen": state.get("tokens_seen")}
    facts["checkpoint"] = checkpoint.name
    return {k: v for k, v in facts.items() if v is not None}


# --- the card ----------------------------------------------------------------------------------------


def read_card(folder: str | os.PathLike) -> dict:
    """The YAML front matter of `folder`'s card ({} when it has none)."""
    import yaml

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}
    try:
        return yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError:
        return {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _model_index(name: str, evaluation: dict) -> list[dict]:
    results = []
    for task, scores in (evaluation.get("tasks") or {}).items():
        metrics = [{"type": k, "value": float(scores[k])} for k in ("acc", "acc_norm") if k in scores]
        results.append({"task": {"type": "multiple-choice"}, "dataset": {"name": task, "type": task},
                        "metrics": metrics})
    for text, scores in (evaluation.get("perplexity") or {}).items():
        metrics = [{"type": k, "value": float(scores[k])} for k in ("ppl", "bits_per_char") if k in scores]
        results.append({"task": {"type": "text-generation"}, "dataset": {"name": text, "type": text},
                        "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def render_card(name: str, facts: dict) -> str:
    from .overrides import yaml_text

    config, run, tok, evaluation = facts["config"], facts.get("run"), facts.get("tokenizer"), facts.get("evaluation")
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pangu-pi", "causal-lm", "custom_code"],
    }
    if run and run.get("base_model"):
        front["base_model"] = run["base_model"]
    if evaluation:
        front["model-index"] = _model_index(name, evaluation)
    front["pangu_pi"] = facts
    head = "---\n" + yaml_text(front) + "---\n\n"

    params = facts["parameters"]
    lines = [
        f"# {name}",
        "",
        "A PanGu-π causal language model (arXiv 2312.17276): a LLaMA-style decoder whose FFN gate is a",
        "series informed activation (SIAF, Σᵢ cᵢ·σ(aᵢ·z + bᵢ)) and whose attention block has augmented",
        "shortcuts (x + Attn(N(x)) + Σ W₂·σ(W₁·N(x))).",
        "",
        "## Architecture",
        "",
        f"- parameters: **{params:,}** ({params / 1e6:.2f} M)",
        f"- {config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, FFN width "
        f"{config['intermediate_size']}, {config['num_attention_heads']} heads "
        f"({config['num_key_value_heads']} KV heads), "
        f"context {config['max_position_embeddings']} positions",
        f"- RoPE: `{config['rope_parameters'].get('rope_type', 'default')}` (theta "
        f"{config['rope_parameters'].get('rope_theta')})",
        f"- SIAF: {config['siaf_terms']} terms of {config['siaf_activation']}, "
        f"{config['siaf_param_shape']} coefficients",
        f"- augmented shortcuts: {config['shortcut_count']} per block, bottleneck d/{config['shortcut_ratio']}, "
        f"{config['shortcut_activation']}",
        "",
        "| config field | value |",
        "|---|---|",
        *(f"| `{k}` | {_fmt(v)} |" for k, v in config.items()),
        "",
        "## Tokenizer",
        "",
    ]
    if tok:
        lines.append(f"- {tok['kind']} tokenizer, {tok['vocab_size']:,} pieces"
                     + (f" (extended from {tok['extended_from']:,})" if tok.get("extended_from") else ""))
        for key, value in tok["special_tokens"].items():
            lines.append(f"- {key.replace('_', ' ')}: `{value['token']}` (id {value['id']})")
        if tok["chat_template"]:
            lines.append(f"- chat template: {tok['chat_turns']}; apply it with `tokenizer.apply_chat_template`")
            if tok.get("turn_end"):
                lines.append(f"- a reply ends with `{tok['turn_end']['token']}` (id {tok['turn_end']['id']}), "
                             "which generation_config.json lists as a stop token")
        else:
            lines.append("- no chat template: a base model, prompt it with plain text")
    else:
        lines.append("No tokenizer was saved with these weights.")
    lines += ["", "## Training", ""]
    if run:
        lines.append(f"- made by: {run['kind']}" + (f", from `{run['base_model']}`" if run.get("base_model") else ""))
        for key, label in (("steps", "optimizer steps"), ("tokens_seen", "tokens seen"), ("seq_len", "sequence length"),
                           ("global_batch_size", "global batch (sequences)"), ("precision", "precision"),
                           ("init_from", "initialised from")):
            if run.get(key) is not None:
                lines.append(f"- {label}: {_fmt(run[key])}")
        if run.get("data_mixture"):
            mixture = ", ".join(f"`{d['path']}` × {d['weight']:g}" for d in run["data_mixture"])
            lines.append(f"- data mixture: {mixture}")
        if run.get("final_train_loss") is not None:
            lines.append(f"- final training loss: {run['final_train_loss']:.4f} (step {run['final_train_loss_step']})")
        if run.get("final_val_loss") is not None:
            lines.append(f"- final validation loss: {run['final_val_loss']:.4f} (step {run['final_val_loss_step']})")
        else:
            lines.append("- validation loss: not measured by this run")
    else:
        lines.append("The writer of these weights knew nothing about a training run (a fresh initialisation, a "
                     "conversion or a resize).")
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["Scored by `pangu-pi eval` (option log-likelihood; acc_norm divides by the option's bytes).", "",
                  "| task | items | acc | acc_norm | chance |", "|---|---|---|---|---|"]
        for task, r in (evaluation.get("tasks") or {}).items():
            lines.append(f"| {task} | {r.get('n', '')} | {r.get('acc', float('nan')):.4f} | "
                         f"{r.get('acc_norm', float('nan')):.4f} | {r.get('chance', float('nan')):.4f} |")
        if evaluation.get("perplexity"):
            lines += ["", "| text | tokens | ppl | bits/char |", "|---|---|---|---|"]
            for text, r in evaluation["perplexity"].items():
                lines.append(f"| {text} | {r.get('tokens', '')} | {r['ppl']:.3f} | {r['bits_per_char']:.4f} |")
    else:
        lines.append("Not evaluated yet: `pangu-pi eval THIS_FOLDER --task FILE...` adds its results here.")
    remote = facts.get("remote_code")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)'
        if remote else "import pangu_pi  # registers the architecture",
        *([] if remote else [f'model = AutoModelForCausalLM.from_pretrained("{name}")']),
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        ("The folder carries its own code (`configuration_pangu_pi.py`, `modeling_pangu_pi.py`, `auto_map` in "
         "config.json): torch and transformers are all it needs. With `pangu-pi` installed, `import pangu_pi` "
         "loads it without trust_remote_code and with the fused SIAF kernels.")
        if remote else "This folder has no code of its own: loading it needs the `pangu-pi` package.",
        "",
        "Serve it with an OpenAI-compatible API (vLLM, the `pangu-pi` package installed):",
        "",
        "```bash",
        f"pangu-pi serve {name} --name {name}",
        "```",
        "",
        "lm-evaluation-harness, where only torch and transformers are installed:",
        "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={name},trust_remote_code=True,dtype=float32 --tasks TASK",
        "```",
        "",
    ]
    return head + "\n".join(lines)


def write_model_card(folder: str | os.PathLike, model=None, run: dict | None = None,
                     evaluation: dict | None = None, name: str | None = None) -> Path:
    """Write `folder`/README.md for `model` (the weights just saved there).

    `run`: facts about the run that made the weights; when None, a fine-tuning run folder holding
    `folder` (RUN/model) is read. Without `model` the card is rebuilt from the folder's config.json
    and its previous card, keeping the run facts (used when evaluation results arrive).
    """
    from .config import PanGuPiConfig

    folder = Path(folder)
    if run and "name" in run:  # the folder's final name, when it is written under a temporary one
        run = dict(run)
        name = run.pop("name")
    previous = read_card(folder).get("pangu_pi", {}) if model is None else {}
    config = model.config if model is not None else PanGuPiConfig.from_pretrained(folder)
    if run is None:
        # A checkpoint written inside a run folder (`pangu-pi finetune` writes RUN/model) describes that run.
        run = previous.get("run") if model is None else run_facts(folder.resolve().parent)
    tokenizer_folder = folder if (folder / "tokenizer.json").is_file() else None
    run_tokenizer = Path(run["run"]) / run_layout.TOKENIZER if run and run.get("run") else None
    if tokenizer_folder is None and run_tokenizer is not None and run_tokenizer.is_dir():
        tokenizer_folder = run_tokenizer  # fine-tuning saves it beside the weights only after them
    if tokenizer_folder is None and run and run.get("base_model"):
        tokenizer_folder = run["base_model"]
    values = config.to_dict()
    facts = {
        "architecture": "PanGuPiForCausalLM",
        "parameters": count_parameters(config)["total"],
        "config": {k: values.get(k) for k in CONFIG_FIELDS},
        "tokenizer": tokenizer_card(tokenizer_folder) or previous.get("tokenizer"),
        "remote_code": (folder / "modeling_pangu_pi.py").is_file(),
    }
    if run:
        facts["run"] = run
    evaluation = evaluation if evaluation is not None else previous.get("evaluation")
    if evaluation:
        facts["evaluation"] = evaluation
    facts["name"] = name or previous.get("name") or folder.name
    path = folder / CARD_FILE
    path.write_text(render_card(facts["name"], facts), encoding="utf-8")
    return path


def add_evaluation(folder: str | os.PathLike, results: dict) -> Path | None:
    """Merge `pangu-pi eval` results into the card of the checkpoint in `folder` (tasks by name)."""
    from .folders import is_checkpoint

    folder = Path(folder)
    if not is_checkpoint(folder):
        return None
    if json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") != "pangu_pi":
        return None  # another architecture's folder: its card is not ours to write
    previous = read_card(folder).get("pangu_pi", {}).get("evaluation") or {}
    merged = {
        "tasks": {**(previous.get("tasks") or {}), **_scores(results.get("tasks") or {})},
        "perplexity": {**(previous.get("perplexity") or {}), **(results.get("perplexity") or {})},
        "chat": results.get("chat"),
    }
    return write_model_card(folder, evaluation=merged)


def _scores(tasks: dict) -> dict:
    keep = ("n", "acc", "acc_norm", "chance")
    return {name: {k: r[k] for k in keep if k in r} for name, r in tasks.items()}
