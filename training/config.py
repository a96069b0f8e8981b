"""The run config of every training recipe: a tree of dataclasses with defaults, read from YAML,
changed with `--set a.b=value`, and checked before any compute is spent.

Pretraining, continued pretraining (`model.init_from`) and fine-tuning (`finetune.mode: full | lora`)
share one schema and one loader (`load_config` / `build_config`): a key means the same thing in
every recipe. Each recipe starts from its own defaults (`RECIPE_DEFAULTS`: fine-tuning takes a lower
learning rate, no weight decay, fp32, a short warmup), and a config file names only what differs.
Unknown keys are refused with the nearest valid key, because a misspelt key silently keeping its
default costs a whole run. Keys of the older fine-tuning layout (`model: DIR`, top-level `seq_len`,
`datasets`, `precision`, `mode`, `lora`, ...) still load, with one note saying where each moved.
The resolved config (defaults filled in, batch split derived) is saved with every checkpoint.

The reader is this module's own (about 100 lines over the dataclasses) rather than a validation
library: it gives the messages users rely on (nearest key, right key in the wrong section, the key
and what it accepts) directly, and `RunConfig` stays a plain dataclass that DeepSpeed-free tools
(`pangu_pi.training.memory`, the benchmarks) import cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pangu_pi.config import ConfigError, PanGuPiConfig
from pangu_pi.overrides import deep_merge as _deep_merge
from pangu_pi.overrides import parse_override
from pangu_pi.overrides import write_yaml as dump_yaml  # noqa: F401 (the trainer and tests name it here)
from pangu_pi.overrides import yaml_text  # noqa: F401 (a config as YAML, in the order it was built)

RECIPES = ("pretrain", "finetune")
# The projections vLLM serves LoRA adapters on (and peft's names for them in this model).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINETUNE_MODES = ("full", "lora", "dpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
GRPO_GENERATORS = ("hf", "vllm")
OPTIMIZER_IMPLEMENTATIONS = ("torch", "deepspeed")


@dataclass
class DataConfig:
    # Each {path: ..., weight: sampling weight}. Pretraining: prepared shard dirs; empty = the embedded
    # default corpus, tokenized by the run itself into the run folder (or `cache_dir`) and reused by
    # later runs. Fine-tuning: chat JSONL files, folders or globs (a bare path string is weight 1).
    datasets: list = field(default_factory=list)
    # Pretraining: the tokenizer dir the shards were made with (required with datasets).
    # Fine-tuning: null = the tokenizer saved with model.init_from.
    tokenizer: str | None = None
    seq_len: int = 512  # tokens per sample; at most model.max_position_embeddings
    val_fraction: float = 0.005
    # Only for the default corpus: how much of it to use (None = all of it), the tokenizer's size,
    # where to keep the tokenizer and shards (None = the run folder) and how many tokenizing workers.
    default_corpus_bytes: int | None = None
    tokenizer_vocab_size: int = 8192
    cache_dir: str | None = None
    workers: int = 1
    # Pretraining: keep the packed documents of a row apart (RoPE positions restart after each EOS,
    # attention stays inside a document; training/documents.py). Fine-tuning rows always are.
    document_masking: bool = False


@dataclass
class BatchConfig:
    # In sequences of seq_len tokens. global = micro × grad_accum × processes; give any two (with the
    # process count known) and the third is derived, or all three if they agree.
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    grad_accum: int | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # paper §5
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # on the global gradient norm; 0 turns clipping off
    # AdamW's implementation: torch (torch.optim.AdamW, fused) | deepspeed (DeepSpeed's FusedAdam on a
    # GPU; on CPU its C++ Adam, built at first use). Which is faster on a GPU: to be measured there.
    implementation: str = "torch"


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of optim.lr
    decay_fraction: float = 0.1  # wsd only: the share of max_steps spent decaying at the end


@dataclass
class TrainConfig:
    max_steps: int | None = 1000  # optimizer steps; fine-tuning: null = finetune.epochs passes over the data
    precision: str = "bf16"  # bf16 | fp32
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO optimizer state in host memory
    # none | full | selective (training/speed.py; true/false still mean full/none). selective keeps
    # every matmul's and attention's output and recomputes the elementwise ops in backward.
    activation_checkpointing: bool | str = False
    compile: bool = False  # torch.compile each decoder block (training/speed.py); GPU default: to be measured
    # The LM head + cross-entropy fused and chunked over tokens: the full-vocabulary logits are never formed.
    fused_loss: bool = True
    max_bad_steps: int = 5  # stop after this many optimizer steps in a row skipped for a non-finite loss/grad
    log_every: int = 1  # write a metrics line every this many optimizer steps
    # Ranks that split each sequence (DeepSpeed Ulysses: training/sequence_parallel.py); the
    # data-parallel degree is processes / sequence_parallel.
    sequence_parallel: int = 1
    # The SIAF FFN and the augmented shortcuts computed a tile of tokens at a time, their
    # intermediates recomputed in backward (DeepSpeed's TiledMLP: training/tiled_compute.py).
    tiled_mlp: bool = False


@dataclass
class CheckpointConfig:
    save_every: int = 1000  # optimizer steps; the last step is always saved
    keep_last: int | None = None  # prune older complete checkpoints; None keeps all
    resume: str = "auto"  # auto: continue from the newest complete checkpoint | none: refuse to reuse a run folder


@dataclass
class EvalConfig:
    every: int = 1000  # optimizer steps; 0 turns validation off
    samples: int = 64  # validation sequences per evaluation, split over the processes


@dataclass
class LogConfig:
    tensorboard: bool = True
    plot: bool = True
    # Peak FLOP/s of one device for MFU; None = looked up from the GPU's name (unknown devices show no MFU).
    peak_flops_per_device: float | None = None
    # Time the step's phases (data, forward, backward, optimizer; `*_s` in metrics.jsonl). Off by
    # default: on a GPU the loop then never waits for the device; on, it records CUDA events and
    # reads them once per logged step.
    phase_times: bool = False
    # A Weights & Biases project to log the metrics to (rank 0); null = off. WANDB_MODE=offline
    # writes the run under OUT/wandb with no network, for `wandb sync` later.
    wandb: str | None = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DpoConfig:
    """Preference tuning (`finetune.mode: dpo`), training/dpo.py."""

    beta: float = 0.1  # how far the policy may move from the reference: the scale of the implicit reward
    loss_type: str = "sigmoid"  # sigmoid: DPO's loss | ipo: IPO's squared loss on length-averaged log-probs
    label_smoothing: float = 0.0  # sigmoid only: the share of pairs assumed mislabelled (conservative DPO)
    # Train LoRA adapters (finetune.lora.*; the reference is the same model with them disabled) rather
    # than every weight. null: LoRA when the config sets any finetune.lora key, else full weights.
    lora: bool | None = None


@dataclass
class GrpoConfig:
    """Online RL with verifiable rewards (`finetune.mode: grpo`), training/recipes/grpo.py."""

    num_generations: int = 8  # G: completions sampled per prompt, normalised against each other
    # grpo: per-sequence token mean, then the mean | dr_grpo: Σ over tokens / (rows × max_completion_length)
    # | dapo: Σ over tokens / the tokens of the whole optimizer step (TRL's definitions)
    loss_type: str = "dapo"
    beta: float = 0.0  # weight of the KL to the reference (k3 estimator); 0 needs no reference at all
    epsilon: float = 0.2  # clip the importance ratio below at 1 - epsilon
    epsilon_high: float | None = None  # ... and above at 1 + epsilon_high (null = epsilon; DAPO's clip-higher: 0.28)
    num_iterations: int = 1  # optimizer steps on each batch of completions (importance ratios from the 2nd on)
    scale_rewards: str = "group"  # group: advantages divided by the group's std | none: Dr. GRPO's unscaled
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 256  # tokens sampled at most per completion
    # [{function: built-in name or module:function, weight: 1.0, name: metric name, ...options}]
    # (training/rewards.py)
    rewards: list = field(default_factory=list)
    generator: str = "hf"  # hf: the policy's own generate() | vllm: a colocated vLLM engine
    # LoRA adapters (finetune.lora.*; the reference is the model with them disabled) rather than
    # every weight. null: LoRA when the config sets any finetune.lora key, else full weights.
    lora: bool | None = None


@dataclass
class FinetuneConfig:
    """What only fine-tuning has."""

    # full: every weight, an HF checkpoint in OUT/model | lora: an adapter in OUT/adapter
    # dpo: preference pairs, full weights (OUT/model) or, with dpo.lora, an adapter (OUT/adapter)
    # grpo: prompts and rewards (online RL), full weights or, with grpo.lora, an adapter
    mode: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    examples: int | None = None  # examples (pairs for dpo, prompts for grpo) drawn per epoch; null = all of them
    epochs: float = 1.0  # passes over the packed rows (pairs, prompts) when train.max_steps is null

    @property
    def uses_lora(self) -> bool:
        return (self.mode == "lora" or (self.mode == "dpo" and bool(self.dpo.lora))
                or (self.mode == "grpo" and bool(self.grpo.lora)))


@dataclass
class RunConfig:
    out: str | None = None  # run folder: checkpoints, metrics, logs
    seed: int = 0
    # A preset and overrides; or `init_from: DIR`, an HF checkpoint whose weights and shape the run
    # starts from (continued pretraining: the optimizer and LR schedule start fresh).
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Passed through to the DeepSpeed config over what we derive (bucket sizes, communication tuning).
    deepspeed: dict = field(default_factory=dict)
    recipe: str = "pretrain"  # set by the loader from the command (pangu-pi pretrain / finetune)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("recipe")
        if self.recipe == "pretrain":
            out.pop("finetune")  # a pretraining config has nothing to say there
        return out

    def model_config(self, vocab_size: int | None = None) -> PanGuPiConfig:
        overrides = {k: v for k, v in self.model.items() if k not in ("preset", "init_from")}
        if self.model.get("init_from"):
            return _checkpoint_model_config(self.model["init_from"], overrides, vocab_size)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return PanGuPiConfig.from_preset(self.model.get("preset", "tiny"), **overrides)


# Keys that fix the weights' shapes: continued pretraining takes them from the base checkpoint.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "shortcut_count", "shortcut_width", "siaf_terms", "siaf_param_shape")


def _checkpoint_model_config(init_from: str, overrides: dict, vocab_size: int | None) -> PanGuPiConfig:
    """`model.init_from`: the base checkpoint's own config, with only shape-neutral overrides."""
    from pangu_pi.folders import is_checkpoint

    path = Path(init_from)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"model.init_from {init_from!r} is not an HF checkpoint (no config.json); "
            "name the folder `pangu-pi export` or `pangu-pi resize` wrote"
        )
    config = PanGuPiConfig.from_pretrained(str(path))
    # A saved run config names the shape it ran with, which agrees with the checkpoint's.
    shaped = [k for k in overrides if k in SHAPE_KEYS and overrides[k] != getattr(config, k, None)]
    if shaped:
        raise ConfigError(
            f"model.{shaped[0]} cannot be changed with model.init_from: the shape comes from {init_from}; "
            "remove it (grow the vocabulary with `pangu-pi resize` first)"
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.init_from {init_from} has {config.vocab_size} "
            "embedding rows; run `pangu-pi resize` on the checkpoint with this tokenizer first"
        )
    return config


# ------------------------------------------------------------------------------------------------
# Reading a tree of plain dicts into the dataclasses, with errors that name the key and the fix.


def _valid_paths(cls=RunConfig, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "recipe":
            continue
        path = prefix + f.name
        paths.append(path)
        sub = _dataclass_type(f.type)
        if sub is not None:
            paths += _valid_paths(sub, path + ".")
        elif path == "model":
            paths += ["model.preset", "model.init_from"] + [f"model.{name}" for name in PanGuPiConfig.field_names()]
    return paths


def _unknown_key(path: str) -> ConfigError:
    candidates = _valid_paths()
    leaf = path.rsplit(".", 1)[-1]
    leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
    # A right key in the wrong section first, then the nearest spelling of the whole path, then of the leaf.
    close = [leaves[leaf]] if leaf in leaves and "." in path else []
    close = close or difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not close:
        match = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        close = [leaves[match[0]]] if match else []
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/training.md for the keys"
    return ConfigError(f"unknown config key {path!r}{hint}")


def _dataclass_type(tp) -> type | None:
    tp = _resolve(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _resolve(tp):
    if isinstance(tp, str):
        return eval(tp, globals())  # annotations are strings under `from __future__ import annotations`
    return tp


def _coerce(path: str, value: Any, tp) -> Any:
    tp = _resolve(tp)
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # `bool | str`: the first type that reads the value wins
            try:
                return _coerce(path, value, option)
            except ConfigError:
                pass
        tp = options[-1]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))  # 4e6 and 4_000_000 both mean an integer
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this reader does not know is a bug here, not user input
        raise TypeError(f"no reader for {tp} at {path}")
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}[tp]
    raise ConfigError(f"config key {path!r} must be {want}, got {value!r}")


def _build(cls, values: Any, prefix: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(cls) if not (cls is RunConfig and f.name == "recipe")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(prefix + str(key))
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _model_section(values: dict) -> dict:
    known = set(PanGuPiConfig.field_names()) | {"preset", "init_from"}
    for key in values:
        if key not in known:
            raise _unknown_key(f"model.{key}")
    return {"preset": "tiny", **values}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections at the top level")
    return data


def run_folder(config_path: str | Path, out: str | None, configured: str | None) -> str:
    """Where a run writes: `--out`, else the config's own `out`, else runs/CONFIG_NAME."""
    return out or configured or str(Path("runs") / Path(config_path).stem)


# What each recipe starts from, under the user's file. Fine-tuning moves a trained model a little:
# a lower peak LR and no pull towards zero; fp32 (a short run, and LoRA's small updates), no eval.
RECIPE_DEFAULTS: dict[str, dict] = {
    "pretrain": {},
    "finetune": {
        "optim": {"lr": 2e-5, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 10},
        "train": {"precision": "fp32", "max_steps": None},
        "eval": {"every": 0},
    },
}

# The older fine-tuning layout, key by key: where each top-level key (or section) went.
OLD_FINETUNE_KEYS = {
    "tokenizer": "data.tokenizer",
    "datasets": "data.datasets",
    "seq_len": "data.seq_len",
    "examples": "finetune.examples",
    "epochs": "finetune.epochs",
    "max_steps": "train.max_steps",
    "precision": "train.precision",
    "zero_stage": "train.zero_stage",
    "mode": "finetune.mode",
    "lora": "finetune.lora",
}
# Keys that moved in every layout.
MOVED_KEYS = {"log.every": "train.log_every"}


def _pop_path(values: dict, path: str) -> tuple[bool, Any]:
    node = values
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _put_path(values: dict, path: str, value: Any) -> None:
    node = values
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def migrate_old_layout(values: dict) -> tuple[dict, list[str]]:
    """Move keys of the older layouts to where they live now; returns (values, ["old → new", ...])."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    moves = []
    if isinstance(values.get("model"), str):
        values["model"] = {"init_from": values["model"]}
        moves.append("model → model.init_from")
    for old, new in {**OLD_FINETUNE_KEYS, **MOVED_KEYS}.items():
        found, value = _pop_path(values, old)
        if found:
            if isinstance(value, dict) and isinstance(values.get(new.split(".")[0]), dict):
                found_new, existing = _pop_path(values, new)
                if found_new and isinstance(existing, dict):
                    value = _deep_merge(existing, value)
            _put_path(values, new, value)
            moves.append(f"{old} → {new}")
    if isinstance(values.get("log"), dict) and not values["log"]:
        values.pop("log")
    return values, moves


def infer_recipe(values: dict) -> str:
    """The recipe a config file is written for, when no command says: fine-tuning if it has a
    `finetune` section or keys of the older fine-tuning layout."""
    if "finetune" in values or isinstance(values.get("model"), str) or set(values) & set(OLD_FINETUNE_KEYS):
        return "finetune"
    return "pretrain"


def _note(text: str) -> None:
    # Every rank reads the config; one note is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"pangu-pi: note: {text}", file=sys.stderr, flush=True)


def build_config(values: dict | None = None, overrides: list[str] | None = None, *,
                 recipe: str | None = None, check_paths: bool = True) -> RunConfig:
    """A checked RunConfig from a dict (as read from YAML) and `a.b=value` overrides, applied in
    order, for `recipe` (pretrain | finetune; None = inferred from the keys). `check_paths=False`
    checks keys and values only, not the folders they name (for a config written for another machine)."""
    values = dict(values or {})
    for item in overrides or []:
        values = _deep_merge(values, parse_override(item))
    if recipe is None:
        recipe = infer_recipe(values)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}")
    values, moves = migrate_old_layout(values)
    if moves:
        _note("this config uses the older fine-tuning layout; it loads, but write the keys where they live now: "
              + ", ".join(moves) + " (docs/training.md)")
    if recipe == "pretrain" and "finetune" in values:
        raise ConfigError("this is a fine-tuning config (it has a `finetune` section or fine-tuning keys); "
                          "run it with `pangu-pi finetune`, or remove the section to pretrain")
    values = _deep_merge(RECIPE_DEFAULTS[recipe], values)
    model = values.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError("config section 'model' must be a mapping such as {preset: tiny}")
    config = _build(RunConfig, values)
    config.model = _model_section(model)
    config.recipe = recipe
    if recipe == "finetune" and config.finetune.dpo.lora is None:
        # DPO on LoRA when the user configured LoRA (finetune.lora.* in the file or a --set).
        user_lora = isinstance(values.get("finetune"), dict) and "lora" in values["finetune"]
        config.finetune.dpo.lora = config.finetune.mode == "dpo" and user_lora
    if recipe == "finetune" and config.finetune.grpo.lora is None:
        user_lora = isinstance(values.get("finetune"), dict) and "lora" in values["finetune"]
        config.finetune.grpo.lora = config.finetune.mode == "grpo" and user_lora
    check(config, check_paths=check_paths)
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                recipe: str | None = None, check_paths: bool = True) -> RunConfig:
    """The one loader of every recipe's run config: YAML file + `--set` overrides, checked."""
    return build_config(load_yaml(path) if path else {}, overrides, recipe=recipe, check_paths=check_paths)


# ------------------------------------------------------------------------------------------------
# Checks that need no process count; the batch split is checked by `resolve_batch` once it is known.


def check(config: RunConfig, check_paths: bool = True) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, o, s, t = config.data, config.optim, config.schedule, config.train
    need(d.seq_len >= 2, f"data.seq_len must be at least 2, got {d.seq_len}")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.workers >= 1, f"data.workers must be at least 1, got {d.workers}")
    finetuning = config.recipe == "finetune"
    for i, entry in enumerate(d.datasets):
        if finetuning and isinstance(entry, str):
            continue  # a chat file, folder or glob, weight 1
        need(
            isinstance(entry, dict) and "path" in entry and set(entry) <= {"path", "weight"},
            f"data.datasets[{i}] must be {{path: {'FILE' if finetuning else 'DIR'}, weight: NUMBER}}, got {entry!r}",
        )
        weight = entry.get("weight", 1.0)
        need(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0 and math.isfinite(weight),
            f"data.datasets[{i}].weight must be a positive number, got {weight!r}",
        )
    if finetuning:
        check_finetune(config)
    else:
        need(
            not d.datasets or d.tokenizer,
            "data.datasets is set but data.tokenizer is not; name the tokenizer dir the shards were prepared with",
        )
        need(t.max_steps is not None, "train.max_steps must be set for pretraining (optimizer steps to train to)")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(
        len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")
    need(s.kind in ("cosine", "wsd", "constant"), f"schedule.kind must be cosine, wsd or constant, got {s.kind!r}")
    need(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    need(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    need(0 < s.decay_fraction <= 1, f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be at least 1, got {t.max_steps}")
    need(t.precision in ("bf16", "fp32"), f"train.precision must be bf16 or fp32, got {t.precision!r}")
    need(t.zero_stage in (1, 2, 3), f"train.zero_stage must be 1, 2 or 3, got {t.zero_stage}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be at least 1, got {t.max_bad_steps}")
    need(t.log_every >= 1, f"train.log_every must be at least 1, got {t.log_every}")
    need(isinstance(t.sequence_parallel, int) and not isinstance(t.sequence_parallel, bool)
         and t.sequence_parallel >= 1,
         f"train.sequence_parallel must be a whole number >= 1 (1: off), got {t.sequence_parallel!r}")
    need(not (t.tiled_mlp and t.compile),
         "train.tiled_mlp recomputes the FFN in DeepSpeed's autograd function, which train.compile's blocks "
         "cannot trace; set one of them to false")
    need(t.activation_checkpointing in (True, False, "none", "full", "selective"),
         f"train.activation_checkpointing must be none, full or selective (true/false mean full/none), "
         f"got {t.activation_checkpointing!r}")
    need(not (t.compile and t.zero_stage == 3),
         "train.compile compiles the decoder blocks, inside which ZeRO-3 gathers each weight with hooks the "
         "compiler cannot trace; use train.zero_stage 1 or 2 with compile, or set train.compile=false")
    need(o.implementation in OPTIMIZER_IMPLEMENTATIONS,
         f"optim.implementation must be {' or '.join(OPTIMIZER_IMPLEMENTATIONS)}, got {o.implementation!r}")
    need(config.checkpoint.save_every >= 1,
         f"checkpoint.save_every must be at least 1, got {config.checkpoint.save_every}")
    need(
        config.checkpoint.keep_last is None or config.checkpoint.keep_last >= 1,
        f"checkpoint.keep_last must be at least 1 or null, got {config.checkpoint.keep_last}",
    )
    need(
        config.checkpoint.resume in ("auto", "none"),
        f"checkpoint.resume must be auto or none, got {config.checkpoint.resume!r}",
    )
    need(config.eval.every >= 0, f"eval.every must be >= 0 (0 = off), got {config.eval.every}")
    need(config.eval.samples >= 1, f"eval.samples must be at least 1, got {config.eval.samples}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        need(key not in config.deepspeed, f"deepspeed.{key} would fight the batch section; set batch.* instead")
    if not check_paths and config.model.get("init_from"):
        return  # the shape comes from a checkpoint this check does not read
    # Building the model config here refuses a bad model section before any process starts.
    model = config.model_config()
    need(
        d.seq_len <= model.max_position_embeddings,
        f"data.seq_len ({d.seq_len}) exceeds the model's max_position_embeddings "
        f"({model.max_position_embeddings}); lower seq_len or set model.max_position_embeddings",
    )


def check_finetune(config: RunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    f, lora = config.finetune, config.finetune.lora
    need(bool(config.model.get("init_from")),
         "set model.init_from to the HF checkpoint folder to fine-tune (e.g. the output of `pangu-pi export`)")
    need(bool(config.data.datasets), "set data.datasets to a list of {path: chat.jsonl, weight: 1.0}")
    need(config.data.seq_len >= 8, f"data.seq_len must be at least 8, got {config.data.seq_len}")
    need(not config.data.document_masking,
         "data.document_masking is a pretraining key: fine-tuning rows already keep each chat apart "
         "(positions from 0, block-causal mask); remove it from the fine-tuning config")
    lora_dpo = "dpo" in str(f.mode).lower() and "lora" in str(f.mode).lower()
    need(f.mode in FINETUNE_MODES, f"finetune.mode must be full, lora or dpo, or grpo (online RL), got {f.mode!r}"
         + ("; for DPO on LoRA adapters set finetune.mode=dpo and finetune.dpo.lora=true" if lora_dpo else ""))
    need(f.examples is None or f.examples >= 1, f"finetune.examples must be at least 1 or null, got {f.examples}")
    need(f.epochs > 0, f"finetune.epochs must be positive, got {f.epochs}")
    dpo = f.dpo
    need(dpo.beta > 0 and math.isfinite(dpo.beta), f"finetune.dpo.beta must be a positive number, got {dpo.beta}")
    need(dpo.loss_type in DPO_LOSSES,
         f"finetune.dpo.loss_type must be {' or '.join(DPO_LOSSES)}, got {dpo.loss_type!r}")
    need(0 <= dpo.label_smoothing < 0.5,
         f"finetune.dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    need(dpo.label_smoothing == 0 or dpo.loss_type == "sigmoid",
         "finetune.dpo.label_smoothing applies to loss_type sigmoid only; set it to 0 for ipo")
    if f.mode == "grpo":
        check_grpo(config)
    if f.uses_lora:
        need(config.train.zero_stage in (1, 2),
             "LoRA trains a few million weights at most: use train.zero_stage 1 or 2, not 3")
        need(lora.r >= 1, f"finetune.lora.r must be at least 1, got {lora.r}")
        need(0 <= lora.dropout < 1, f"finetune.lora.dropout must be in [0, 1), got {lora.dropout}")
        need(bool(lora.target_modules),
             "finetune.lora.target_modules is empty; name some of " + ", ".join(LORA_TARGETS))
        for name in lora.target_modules:
            close = difflib.get_close_matches(str(name), LORA_TARGETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            need(name in LORA_TARGETS,
                 f"finetune.lora.target_modules: {name!r} is not a projection vLLM serves LoRA on{hint} "
                 f"(choose among {', '.join(LORA_TARGETS)})")


def check_grpo(config: RunConfig) -> None:
    """`finetune.grpo.*`, checked before any compute (the rewards are imported by the recipe's plan)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    g = config.finetune.grpo
    need(g.num_generations >= 2, f"finetune.grpo.num_generations (G) must be at least 2: advantages compare a "
                                 f"completion with the others of its group; got {g.num_generations}")
    need(g.loss_type in GRPO_LOSSES, f"finetune.grpo.loss_type must be {', '.join(GRPO_LOSSES)}, got {g.loss_type!r}")
    need(g.beta >= 0 and math.isfinite(g.beta), f"finetune.grpo.beta must be >= 0 (0: no KL term), got {g.beta}")
    need(0 < g.epsilon < 1, f"finetune.grpo.epsilon must be in (0, 1), got {g.epsilon}")
    need(g.epsilon_high is None or g.epsilon_high > 0,
         f"finetune.grpo.epsilon_high must be positive or null, got {g.epsilon_high}")
    need(g.num_iterations >= 1, f"finetune.grpo.num_iterations must be at least 1, got {g.num_iterations}")
    need(g.scale_rewards in ("group", "none"),
         f"finetune.grpo.scale_rewards must be group or none, got {g.scale_rewards!r}")
    need(g.temperature > 0 and math.isfinite(g.temperature),
         f"finetune.grpo.temperature must be positive, got {g.temperature}")
    need(0 < g.top_p <= 1, f"finetune.grpo.top_p must be in (0, 1], got {g.top_p}")
    need(1 <= g.max_completion_length < config.data.seq_len,
         f"finetune.grpo.max_completion_length ({g.max_completion_length}) must be at least 1 and below data.seq_len "
         f"({config.data.seq_len}), which holds the prompt and the completion")
    need(g.generator in GRPO_GENERATORS, f"finetune.grpo.generator must be hf or vllm, got {g.generator!r}")
    need(bool(g.rewards), "finetune.grpo.rewards is empty; list at least one, e.g. "
                          "[{function: numeric_answer, weight: 1.0}]")
    need(config.train.zero_stage in (1, 2),
         "finetune.mode grpo samples with the policy's own generate(), which under ZeRO-3 would gather every "
         "weight per token; use train.zero_stage 1 or 2")


@dataclass(frozen=True)
class BatchSplit:
    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int


def resolve_batch(batch: BatchConfig, world_size: int) -> BatchSplit:
    """global = micro × grad_accum × world_size, exactly; derive the one left unset, refuse the impossible."""
    g, m, a, w = batch.global_batch_size, batch.micro_batch_size, batch.grad_accum, world_size
    for name, value in (("global_batch_size", g), ("micro_batch_size", m), ("grad_accum", a)):
        if value is not None and value < 1:
            raise ConfigError(f"batch.{name} must be at least 1, got {value}")
    if m is None and (g is None or a is None):
        raise ConfigError("set batch.micro_batch_size (sequences per process per forward), or both "
                          "batch.global_batch_size and batch.grad_accum to derive it")
    if g is None:
        a = a or 1
        return BatchSplit(m * a * w, m, a, w)
    if m is None:
        if g % (a * w):
            raise ConfigError(
                f"batch.global_batch_size {g} is not divisible by grad_accum {a} × {w} processes = {a * w}; "
                f"pick a global batch that is a multiple of {a * w}"
            )
        return BatchSplit(g, g // (a * w), a, w)
    if a is None:
        if g % (m * w):
            raise ConfigError(
                f"batch.global_batch_size {g} is not divisible by micro_batch_size {m} × {w} processes = {m * w}; "
                f"pick a global batch that is a multiple of {m * w} or another micro batch"
            )
        return BatchSplit(g, m, g // (m * w), w)
    if g != m * a * w:
        raise ConfigError(
            f"batch.global_batch_size {g} ≠ micro_batch_size {m} × grad_accum {a} × {w} processes = {m * a * w}; "
            "fix one of them, or leave batch.grad_accum unset to derive it"
        )
    return BatchSplit(g, m, a, w)


def resolved_dict(config: RunConfig, split: BatchSplit | None = None, vocab_size: int | None = None) -> dict:
    """The config as it ran (defaults filled in, batch split and vocabulary size derived), in a form
    `load_config` reads back. Saved with every checkpoint."""
    out = config.to_dict()
    if vocab_size is not None:
        out["model"] = {**out["model"], "vocab_size": vocab_size}
    if split is not None:
        out["batch"] = {
            "global_batch_size": split.global_batch_size,
            "micro_batch_size": split.micro_batch_size,
            "grad_accum": split.grad_accum,
        }
    return out

