"""A LoRA adapter trained by `pangu-pi finetune` is served by `pangu-pi serve --lora` and changes the
answer exactly as the HF model with the same adapter (through peft) does."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import yaml

from serving_fixtures import PANGU_PI, hf_greedy, start_server

pytestmark = pytest.mark.slow

QUESTION = "What is the annual rate on the savings plan?"
ANSWER = "The savings plan pays four percent a year, compounded monthly."


@pytest.fixture(scope="module")
def finetuned_adapter(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned-lora")
    chat = root / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    chat.write_text((json.dumps(record) + "\n") * 16)
    config = root / "lora.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(base_dir),
                "out": str(root / "run"),
                "datasets": [{"path": str(chat)}],
                "seq_len": 128,
                "max_steps": 30,
                "batch": {"micro_batch_size": 4},
                "optim": {"lr": 1e-2},
                "schedule": {"warmup_steps": 2, "kind": "cosine", "min_lr_ratio": 0.0},
                "mode": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "log": {"tensorboard": False, "plot": False},
            }
        )
    )
    proc = subprocess.run(
        [PANGU_PI, "finetune", "--config", str(config), "--no-progress"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "adapter"


@pytest.fixture(scope="module")
def finetuned_server(base_dir, finetuned_adapter, serve_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "finetuned_lora_server.log"
    server = start_server(
        [str(base_dir), "--name", "pangu", "--lora", f"tuned={finetuned_adapter}", "--max-model-len", "256"],
        serve_env,
        log,
        None,
    )
    yield server
    server.stop()
    server.kill_leftovers()


def test_finetuned_adapter_served_matches_peft_and_changes_the_answer(
    finetuned_server, finetuned_adapter, base_dir, hf_models
):
    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    with httpx.Client(base_url=finetuned_server.url, timeout=300) as http:
        reply = http.post(
            "/v1/completions",
            json={
                "model": "tuned",
                "prompt": prompt_ids,
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 0,
                "return_tokens_as_token_ids": True,
            },
        )
    assert reply.status_code == 200, reply.text
    served = [int(t.split(":")[1]) for t in reply.json()["choices"][0]["logprobs"]["tokens"]]
    assert served == hf_greedy(hf_models(base_dir, finetuned_adapter), prompt_ids, 12)
    assert served != hf_greedy(hf_models(base_dir), prompt_ids, 12), "the trained adapter should change the answer"
    # It learnt its one answer: the served continuation starts with it.
    assert tokenizer.decode(served).strip().startswith(ANSWER[:12])
