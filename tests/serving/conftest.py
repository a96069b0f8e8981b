"""Tiny checkpoints and real `pangu-pi serve` processes shared by the serving tests.

Each server takes about a minute to start on two CPU cores, so each is started once per session and
torn down (whole process tree) at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serving_fixtures import API_KEY, start_server


@pytest.fixture(scope="session")
def base_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_pangu

    return build_pangu(tmp_path_factory.mktemp("ckpt") / "pangu-tiny", tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    from tiny_models import build_lora_adapter

    return build_lora_adapter(base_dir, tmp_path_factory.mktemp("lora") / "domain", seed=3)


@pytest.fixture(scope="session")
def yunshan_dir(tmp_path_factory) -> Path:
    """A variant with a vocabulary of its own, as YunShan's: another tokenizer, another model."""
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import train_tokenizer
    from tiny_models import build_pangu

    root = tmp_path_factory.mktemp("yunshan")
    files = default_corpus_files(limit_bytes=1_000_000)
    tokenizer = train_tokenizer(files, root / "tokenizer", vocab_size=1500, progress=False)
    return build_pangu(root / "yunshan-tiny", tokenizer, seed=11)


@pytest.fixture(scope="session")
def scalar_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A variant on the other SIAF code path: scalar coefficients with learnt outer weights."""
    from tiny_models import build_pangu

    return build_pangu(
        tmp_path_factory.mktemp("ckpt") / "pangu-scalar",
        tokenizer_dir,
        seed=5,
        siaf_param_shape="scalar",
        siaf_learn_weight=True,
        siaf_terms=3,
        shortcut_activation="silu",
    )


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory) -> dict[str, str]:
    scratch = tmp_path_factory.mktemp("serve-scratch")
    env = dict(os.environ)
    env.update(
        TMPDIR=str(scratch),
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PANGU_PI_API_KEY", None)
    return env


@pytest.fixture(scope="session")
def lora_server(base_dir, lora_dir, serve_env, tmp_path_factory):
    """One engine, tensor-parallel over two ranks (so every answer also checks the sharded layers),
    serving the base model as "pangu" and the LoRA adapter as "domain", key required."""
    log = tmp_path_factory.mktemp("logs") / "lora_server.log"
    server = start_server(
        [
            str(base_dir),
            "--name",
            "pangu",
            "--lora",
            f"domain={lora_dir}",
            "--max-model-len",
            "256",
            "--tensor-parallel-size",
            "2",
        ],
        serve_env,
        log,
        API_KEY,
    )
    yield server
    server.stop()
    server.kill_leftovers()


@pytest.fixture(scope="session")
def hf_models():
    """HF models by checkpoint folder, loaded once: the reference every served answer is checked against."""
    import torch

    from pangu_pi import PanGuPiForCausalLM

    cache = {}

    def load(path: Path, adapter: Path | None = None):
        key = (str(path), str(adapter))
        if key not in cache:
            model = PanGuPiForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter)).eval()
            cache[key] = model
        return cache[key]

    return load
