"""Self-contained checkpoints: what `pangu-pi init`, `convert-llama`, fine-tuning and export write loads with
`trust_remote_code=True` in a Python that holds torch and transformers (and their dependencies) only,
and computes the project model's logits and greedy tokens there."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pangu_pi.cli import main as cli

IDS = [[5, 17, 99, 4, 250, 31, 7, 64, 12, 300, 8, 2, 45]]
NEW_TOKENS = 12


def _distribution_closure(roots: list[str]) -> list[md.Distribution]:
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this install does without
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """A folder of links to torch, transformers and what they require, nothing else: the whole
    sys.path (besides the standard library) of the isolated interpreter below."""
    site = tmp_path_factory.mktemp("bare-site")
    for dist in _distribution_closure(["torch", "transformers"]):
        base = Path(dist.locate_file(""))
        tops = set()
        for f in dist.files or []:
            first = Path(f).parts[0]
            if first.endswith((".dist-info", ".egg-info")) or first in ("..", "__pycache__") or first.startswith("."):
                continue
            if first.endswith(".py") or (base / first).is_dir() or first.endswith(".so"):
                tops.add(first)
        for top in tops:
            link = site / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)
        info = Path(dist._path)  # metadata, so importlib.metadata.version() works for transformers' checks
        if not (site / info.name).exists():
            (site / info.name).symlink_to(info)
    assert not (site / "pangu_pi").exists() and not (site / "triton").exists()
    return site


def run_bare(site: Path, script: str, cwd: Path) -> subprocess.CompletedProcess:
    # -I: no user site, no PYTHON* variables, no script folder; -S: no site-packages at all.
    bootstrap = f"import sys; sys.path.insert(0, {str(site)!r})\n" + script
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HOME"] = str(cwd / "hf-home")  # where transformers keeps the checkpoint's code module
    return subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


BARE_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    for name in ("pangu_pi", "triton", "deepspeed", "vllm", "serving", "training"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise SystemExit(f"{name} is importable in the bare interpreter")
    import torch
    from transformers import AutoModelForCausalLM
    """
)


def _bare_load(site: Path, folders: dict[str, Path], tmp_path: Path) -> dict:
    script = BARE_SCRIPT + textwrap.dedent(
        f"""
        folders = {json.dumps({k: str(v) for k, v in folders.items()})}
        results = {{}}
        ids = torch.tensor({IDS})
        for name, folder in folders.items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model(ids).logits
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS},
                                    do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
            torch.save({{"logits": logits, "tokens": tokens, "class": type(model).__name__}},
                       {str(tmp_path)!r} + f"/{{name}}.pt")
        print("bare ok")
        """
    )
    result = run_bare(site, script, tmp_path)
    assert result.returncode == 0 and "bare ok" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    return {name: torch.load(tmp_path / f"{name}.pt") for name in folders}


def test_every_writer_ships_code_and_auto_map(checkpoints):
    for name, folder in checkpoints.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pangu_pi.PanGuPiForCausalLM", name
        for code in ("configuration_pangu_pi.py", "modeling_pangu_pi.py"):
            text = (folder / code).read_text()
            assert "pangu_pi" not in re.findall(r"^\s*(?:from|import)\s+(\S+)", text, re.M), (name, code)
            assert not re.search(r"^\s*(from|import)\s+(triton|deepspeed|vllm)", text, re.M), (name, code)
    converted = json.loads((checkpoints["converted"] / "config.json").read_text())
    assert converted["rope_parameters"]["rope_type"] == "linear"


@pytest.mark.slow
def test_bare_transformers_loads_them_with_the_project_logits_and_tokens(checkpoints, pretrained_export, bare_site,
                                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401 - the project model, for reference

    folders = {**checkpoints, "exported": pretrained_export[1]}
    bare = _bare_load(bare_site, folders, tmp_path)
    ids = torch.tensor(IDS)
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model).__module__ == "pangu_pi.modeling"
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                use_cache=True, eos_token_id=None, pad_token_id=0)
        assert bare[name]["class"] == "PanGuPiForCausalLM"
        assert (bare[name]["logits"] - logits).abs().max() <= 1e-5, name
        assert torch.equal(bare[name]["tokens"], tokens), name
        assert tokens.shape[1] == ids.shape[1] + NEW_TOKENS


def test_no_remote_code_flag_leaves_the_code_out(tokenizer_dir, tmp_path):
    out = tmp_path / "plain"
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--no-remote-code"]) == 0
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "modeling_pangu_pi.py").exists() and not (out / "configuration_pangu_pi.py").exists()
    from pangu_pi import PanGuPiForCausalLM

    model = PanGuPiForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "again", remote_code=True)
    assert (tmp_path / "again" / "modeling_pangu_pi.py").is_file()
    model.save_pretrained(tmp_path / "again", remote_code=False)
    assert not (tmp_path / "again" / "modeling_pangu_pi.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_generated_code_refuses_an_import_it_has_no_rule_for():
    from pangu_pi.remote_code import RemoteCodeError, _replace_imports

    with pytest.raises(RemoteCodeError, match="no rule"):
        _replace_imports("from .tokenizer import load_tokenizer\n", {}, "pangu_pi/modeling.py")
    with pytest.raises(RemoteCodeError, match="would need pangu_pi"):
        _replace_imports("def f():\n    from pangu_pi import vocab\n", {}, "pangu_pi/modeling.py")
