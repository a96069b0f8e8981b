"""`pangu-pi finetune` on a tiny model: full and LoRA runs, assistant-only loss, packing isolation,
malformed-record reporting, config errors; and continued pretraining from a base checkpoint."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pangu_pi.config import ConfigError

PANGU_PI = str(Path(sys.executable).with_name("pangu-pi"))

IM_END = "<|im_end|>"


def _chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "Answer with the sum."})
        rows.append({"messages": messages})
    return rows


MALFORMED = [
    '{"messages": [{"role": "user", "content": "no answer here"}]}',
    '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "' + "word " * 400 + '"}, {"role": "assistant", "content": "ok"}]}',
    '{"messages": [ not json',
]


@pytest.fixture(scope="session")
def base_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference")
    model = PanGuPiForCausalLM(config)
    out = tmp_path_factory.mktemp("ft-base") / "base"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft-data") / "chat.jsonl"
    lines = [json.dumps(r) for r in _chat_records(48)]
    for i, bad in enumerate(MALFORMED):
        lines.insert(5 + 7 * i, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(base_dir, chat_file, out, mode: str = "full", max_steps: int = 16, **extra) -> dict:
    config = {
        "model": {"init_from": str(base_dir)},
        "out": str(out),
        "data": {"datasets": [{"path": str(chat_file), "weight": 1.0}], "seq_len": 128},
        "train": {"max_steps": max_steps},
        "batch": {"micro_batch_size": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "finetune": {"mode": mode},
        "log": {"tensorboard": False},
    }
    config.update(extra)
    return config


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def full_run(base_dir, chat_file, tmp_path_factory):
    from pangu_pi.training.finetune import finetune
    from pangu_pi.net import free_port

    mp = pytest.MonkeyPatch()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        mp.setenv(key, value)
    try:
        out = tmp_path_factory.mktemp("ft-full") / "run"
        summary = finetune(_config(base_dir, chat_file, out), progress=False)
    finally:
        mp.undo()
    return summary, out


def test_full_finetune_lowers_the_loss_and_exports_an_hf_checkpoint(full_run, base_dir):
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401 - registers the model type
    from pangu_pi.training.metrics import METRICS_FILE, PLOT_FILE, read_metrics

    summary, out = full_run
    losses = [r["loss"] for r in read_metrics(out / METRICS_FILE) if "loss" in r]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]
    assert (out / PLOT_FILE).is_file()
    tuned = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "generation_config.json").is_file()
    ids = [5, 17, 99, 4, 250]
    assert not torch.allclose(_logits(tuned, ids), _logits(base, ids), atol=1e-3)
    assert json.loads((out / "finetune_summary.json").read_text())["final_loss"] == pytest.approx(losses[-1])


def test_malformed_records_are_counted_and_reported_not_fatal(full_run, capsys):
    summary, out = full_run
    records = json.loads((out / "finetune_summary.json").read_text())["records"]
    assert records["read"] == 48 + len(MALFORMED)
    assert records["kept"] == 48
    assert records["malformed"] == {"no_assistant_turn": 1, "unknown_role": 1, "too_long": 1, "bad_json": 1}
    assert summary["records"] == records


def test_only_assistant_tokens_carry_loss(base_dir, chat_file, tmp_path):
    from pangu_pi.training.finetune import build_finetune_config
    from pangu_pi.training.recipes.sft import load_data
    from pangu_pi.training.sft_data import IGNORE_INDEX

    tokenizer, data = load_data(build_finetune_config(_config(base_dir, chat_file, tmp_path)))
    answers = {m["content"] + IM_END for r in _chat_records(48) for m in r["messages"] if m["role"] == "assistant"}
    spans_seen = 0
    for row in range(len(data)):
        labels = data[row]["labels"].tolist()
        ids = data[row]["input_ids"].tolist()
        assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids))
        span: list[int] = []
        for label in labels + [IGNORE_INDEX]:
            if label != IGNORE_INDEX:
                span.append(label)
            elif span:
                text = tokenizer.decode(span).strip()
                # Every labelled run is (the tail of) an assistant answer and its end-of-turn token:
                # never the system or user text, never the template's role headers.
                assert any(a.endswith(text) for a in answers), text
                assert "plus" in text or text.endswith(IM_END)
                spans_seen += 1
                span = []
    assert spans_seen == 48


def test_packing_lets_no_example_see_another(base_dir, chat_file, tmp_path):
    from pangu_pi import PanGuPiForCausalLM
    from pangu_pi.training.finetune import build_finetune_config
    from pangu_pi.training.recipes.sft import load_data
    from pangu_pi.training.sft_data import collate

    _, data = load_data(build_finetune_config(_config(base_dir, chat_file, tmp_path)))
    model = PanGuPiForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    row = next(data[i] for i in range(len(data)) if int((data[i]["position_ids"] == 0).sum()) >= 3)
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
    first_end = starts[1]
    perturbed = {k: v.clone() for k, v in row.items()}
    perturbed["input_ids"][:first_end] = (perturbed["input_ids"][:first_end] * 7 + 11) % 1000 + 10
    with torch.no_grad():
        outs = []
        for r in (row, perturbed):
            batch = collate([r])
            batch.pop("labels")
            outs.append(model(**batch).logits[0])
    assert not torch.allclose(outs[0][:first_end], outs[1][:first_end], atol=1e-4)
    torch.testing.assert_close(outs[0][first_end:], outs[1][first_end:], rtol=0, atol=1e-5)


def test_lora_adapter_saves_in_the_served_layout_and_changes_the_output(base_dir, chat_file, tmp_path):
    from peft import PeftModel

    from pangu_pi import PanGuPiForCausalLM

    # Through the command (its own process: DeepSpeed keeps one process group per process).
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(_config(base_dir, chat_file, tmp_path / "lora", mode="lora", max_steps=8)))
    proc = subprocess.run(
        [PANGU_PI, "finetune", "--config", str(config), "--no-progress", "--set", "finetune.lora.r=4",
         "--set", "finetune.lora.alpha=8", "--set", "finetune.lora.dropout=0",
         "--set", "finetune.lora.target_modules=[q_proj,v_proj,gate_proj]"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "malformed records: 4" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "lora" / "finetune_summary.json").read_text())
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj", "gate_proj"}
    assert summary["final_loss"] < summary["first_loss"]
    base = PanGuPiForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = [5, 17, 99, 4, 250]
    before = _logits(base, ids)
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert not torch.allclose(_logits(tuned, ids), before, atol=1e-4)
    assert summary["trainable_parameters"] < 0.1 * sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1e-3", "did you mean 'optim.lr'"),
        ("finetune.lora.rank=4", "did you mean 'finetune.lora.r'"),
        ("warmup_steps=3", "did you mean 'schedule.warmup_steps'"),
        ("finetune.mode=qlora", "finetune.mode must be full, lora.*got 'qlora'"),
        ("finetune.lora.target_modules=[q_prj]", "did you mean 'q_proj'"),
    ],
)
def test_bad_config_is_refused_with_the_fix(base_dir, chat_file, tmp_path, override, message):
    from pangu_pi.training.finetune import build_finetune_config

    mode = "lora" if override.startswith("finetune.lora.target") else "full"
    values = _config(base_dir, chat_file, tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_finetune_config(values, [override])


def test_cli_reports_a_missing_model_in_one_line(chat_file, tmp_path, capsys):
    from pangu_pi import cli

    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {{init_from: {tmp_path / 'nowhere'}}}\ndata: {{datasets: [{{path: {chat_file}}}]}}\n"
                      "finetune: {mode: full}\n")
    assert cli.main(["finetune", "--config", str(config), "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert "pangu-pi finetune: error:" in err and "pangu-pi export" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Continued pretraining: `model.init_from` starts `pangu-pi pretrain` from a base checkpoint.


@pytest.mark.slow
def test_init_from_continues_from_the_base_weights_under_zero3(base_dir, tokenizer_dir, tmp_path):
    import torch.nn.functional as F

    from pangu_pi import PanGuPiForCausalLM
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import load_tokenizer, tokenizer_hash
    from pangu_pi.training.data import PackedMixture, prepare_shards
    from pangu_pi.training.metrics import METRICS_FILE, read_metrics

    shards = tmp_path / "shards"
    prepare_shards(tokenizer_dir, [str(f) for f in default_corpus_files(limit_bytes=300_000)], shards, progress=False)
    warmup, lr = 4, 1e-3
    run = {
        "out": str(tmp_path / "run"),
        "model": {"init_from": str(base_dir), "siaf_backend": "reference"},
        "data": {"datasets": [{"path": str(shards), "weight": 1.0}], "tokenizer": str(tokenizer_dir), "seq_len": 64},
        "batch": {"micro_batch_size": 2, "global_batch_size": 4},
        "optim": {"lr": lr},
        "schedule": {"warmup_steps": warmup},
        "train": {"max_steps": 2, "precision": "fp32", "zero_stage": 3},
        "eval": {"every": 0},
        "log": {"tensorboard": False, "plot": False},
    }
    config = tmp_path / "continue.yaml"
    config.write_text(yaml.safe_dump(run))
    proc = subprocess.run([PANGU_PI, "pretrain", "--config", str(config), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "loss" in r]

    # The first step's loss is the base model's own loss on that step's batch (both ranks' halves):
    # the weights came from the checkpoint, not from a fresh initialisation.
    tokenizer = load_tokenizer(tokenizer_dir)
    data = PackedMixture([{"path": str(shards), "weight": 1.0}], split="train", seq_len=64,
                         eos_id=tokenizer.eos_token_id, vocab_size=len(tokenizer),
                         tokenizer_hash=tokenizer_hash(tokenizer_dir), val_fraction=0.005, seed=0)
    base = PanGuPiForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for rank in range(2):
            batch = data.batch(rank * 2, 2)
            logits = base(input_ids=batch[:, :-1]).logits
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item())
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, abs=1e-4)
    # A fresh optimizer and schedule: step 1 runs at the first warmup LR, not where a run left off.
    assert rows[0]["lr"] == pytest.approx(lr / warmup)
    assert rows[1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-6)


def test_init_from_takes_the_shape_from_the_checkpoint(base_dir, tmp_path):
    from pangu_pi.training.config import build_config

    config = build_config({"model": {"init_from": str(base_dir)}})
    assert config.model_config().hidden_size == json.loads((base_dir / "config.json").read_text())["hidden_size"]
    with pytest.raises(ConfigError, match="cannot be changed with model.init_from"):
        build_config({"model": {"init_from": str(base_dir), "hidden_size": 64}})
    with pytest.raises(ConfigError, match="pangu-pi resize"):
        config.model_config(vocab_size=10**6)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_config({"model": {"init_from": str(tmp_path / "missing")}})


def test_model_overrides_reach_the_saved_model_and_every_checkpoint(base_dir, chat_file, tmp_path):
    """A long-context fine-tune (`--set model.max_position_embeddings=...` and a YaRN RoPE) saves a
    long-context model: the run's model config, not the base checkpoint's, in OUT/model and in every
    checkpoint, and transformers loads it with the scaled RoPE."""
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401 - registers the model type
    from pangu_pi.training.finetune import build_finetune_config, finetune

    assert json.loads((base_dir / "config.json").read_text())["max_position_embeddings"] != 2048
    values = _config(base_dir, chat_file, tmp_path / "long", max_steps=4, checkpoint={"save_every": 2})
    overrides = ["model.max_position_embeddings=2048",
                 "model.rope_parameters={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 512}"]
    finetune(build_finetune_config(values, overrides), progress=False)

    out = tmp_path / "long"
    saved = [out / "model" / "config.json", *sorted((out / "checkpoints").glob("step_*/model/config.json"))]
    assert len(saved) == 3  # the model and the checkpoints of steps 2 and 4
    for path in saved:
        config = json.loads(path.read_text())
        assert config["max_position_embeddings"] == 2048, path
        assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4.0, path
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == "yarn" and model.config.max_position_embeddings == 2048
    # YaRN stretches the low frequencies and scales the attention logits; the base's RoPE does neither.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).model.rotary_emb
    assert rotary.attention_scaling > 1.0 == base.attention_scaling
    assert rotary.inv_freq[-1] < base.inv_freq[-1]


def test_the_step_loop_reads_the_device_back_only_at_logged_steps(base_dir, chat_file, tmp_path, monkeypatch):
    """No host synchronisation per step: every way a tensor's value reaches the host (`.item()`,
    `.tolist()`, `float()`, `bool()`, ...) and every `torch.cuda.synchronize` is counted while a
    run trains 6 steps of 2 micro-batches, logging every 3rd. The trainer's own code (the core, the
    recipes, evaluation, timing) reads back once per logged step and never synchronises."""
    import pangu_pi.training.core as core
    from pangu_pi.training.finetune import build_finetune_config, finetune
    from pangu_pi.training.metrics import METRICS_FILE, read_metrics

    training = Path(core.__file__).parent
    watched = {str(p) for p in (training / "core.py", training / "evaluation.py", training / "timing.py",
                                *(training / "recipes").glob("*.py"))}
    reads: list[tuple[str, str]] = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in watched:
                reads.append((name, caller.co_name))
            return real(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(a))

    values = _config(base_dir, chat_file, tmp_path / "run", batch={"micro_batch_size": 2, "global_batch_size": 4},
                     train={"max_steps": 6, "log_every": 3}, checkpoint={"save_every": 100})
    finetune(build_finetune_config(values), progress=False)
    assert syncs == []
    assert reads == [("tolist", "log_step")] * 2  # steps 3 and 6: one read-back each
    rows = [r for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert not {"data_s", "forward_s", "backward_s", "optimizer_s"} & set(rows[0])  # phase times only when asked


def test_phase_times_are_logged_when_asked(base_dir, chat_file, tmp_path):
    from pangu_pi.training.finetune import build_finetune_config, finetune
    from pangu_pi.training.metrics import METRICS_FILE, read_metrics

    values = _config(base_dir, chat_file, tmp_path / "run", max_steps=2,
                     log={"tensorboard": False, "phase_times": True})
    finetune(build_finetune_config(values), progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "loss" in r]
    assert len(rows) == 2
    for row in rows:
        assert all(row[f"{phase}_s"] > 0 for phase in ("data", "forward", "backward", "optimizer")), row


def test_the_phase_timer_records_cuda_events_only_when_asked(monkeypatch):
    """The GPU path of the timer, on a CPU twin: events stand in for torch.cuda.Event."""
    from pangu_pi.training.timing import PhaseTimer

    made, waits = [], []

    class Event:
        def __init__(self, enable_timing=False):
            made.append(self)

        def record(self):
            self.t = len(made)

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            return 1000.0 * (end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    cuda = torch.device("cuda", 0)
    off = PhaseTimer(False, cuda)
    for _ in range(3):
        off.begin_step()
        for phase in ("data", "forward", "backward", "optimizer"):
            off.mark(phase)
    assert off.read() == {} and made == [] and waits == []

    on = PhaseTimer(True, cuda)
    for _ in range(2):
        on.begin_step()
        for phase in ("data", "forward", "backward", "optimizer"):
            on.mark(phase)
    assert waits == []  # nothing waits until the times are read
    assert on.read() == {"data_s": 1.0, "forward_s": 1.0, "backward_s": 1.0, "optimizer_s": 1.0}
    assert len(waits) == 1


def test_resuming_a_checkpoint_no_run_of_the_folder_wrote_warns(full_run, base_dir, chat_file, tmp_path, capsys):
    """A run folder handed over (copied without its run marker): its checkpoints are code to torch.load,
    and the resume says so."""
    import shutil

    from pangu_pi.training.finetune import finetune

    _, out = full_run
    handed = tmp_path / "handed"
    shutil.copytree(out, handed, ignore=shutil.ignore_patterns(".pangu-pi-run*"))
    finetune(_config(base_dir, chat_file, handed), progress=False)
    printed = capsys.readouterr().out
    assert "already at step 16" in printed
    assert "warning: resuming from" in printed and "which no run of this folder wrote" in printed
    assert "weights_only=False" in printed
