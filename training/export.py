"""`pangu-pi export CKPT OUT`: a training checkpoint as an HF checkpoint.

ZeRO keeps the fp32 weights in per-rank partitions; DeepSpeed's zero_to_fp32 gathers them into one
state dict, which becomes a `PanGuPiForCausalLM` saved as safetensors with its config, the tokenizer
the data was made with, and a generation config that stops at EOS and at the chat turn end.
`AutoModelForCausalLM.from_pretrained(OUT)` (after `import pangu_pi`, or with trust_remote_code=True where
only transformers is installed) and the serving layer load it; README.md is its model card.

CKPT may be a checkpoint folder (`OUT/checkpoints/step_N`), a run's `checkpoints/` folder or the run
folder itself (the newest complete checkpoint is taken).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from pangu_pi.errors import UserError

from pangu_pi import run_layout as layout

from .checkpoint import consolidated_state_dict, resolve_checkpoint

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _training_precision(ckpt: Path) -> str:
    import yaml

    try:
        config = yaml.safe_load((ckpt / layout.RUN_CONFIG).read_text()) or {}
        return config.get("train", {}).get("precision", "fp32")
    except FileNotFoundError:
        return "fp32"


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                      force: bool = False, remote_code: bool = True) -> Path:
    """Write an HF checkpoint of `ckpt` into `out` (created whole, or not at all). Returns `out`.

    With `remote_code` (the default) the folder carries its own code and loads in transformers alone
    with trust_remote_code=True; its README.md model card states what the run knew at that step."""
    import torch
    from transformers import GenerationConfig

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import PAD, folder_chat_template, stop_token_ids, template_status, write_chat_template

    path = resolve_checkpoint(ckpt)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another OUT or pass --force to replace it")
    config_file = path / layout.MODEL_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no model/config.json; it was not written by `pangu-pi pretrain`")
    if dtype is None:
        dtype = "bfloat16" if _training_precision(path) == "bf16" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; choose one of float32, bfloat16, float16")
    torch_dtype = getattr(torch, DTYPES[dtype])

    config = PanGuPiConfig.from_json_file(str(config_file))
    config.use_cache = True  # off while training; generation wants it
    with torch.device("meta"):
        expected = set(PanGuPiForCausalLM(config).state_dict())
    state = {k: v.to(torch_dtype) for k, v in consolidated_state_dict(path, expected).items()}
    model = PanGuPiForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        from pangu_pi.model_card import pretraining_facts

        tok_src = path / layout.TOKENIZER
        if tok_src.is_dir():  # before the weights, so the model card describes the tokenizer
            for f in tok_src.iterdir():
                if f.is_file() and not f.name.endswith(".lock"):
                    shutil.copy2(f, staged / f.name)
            # A run begun before tool calling holds the earlier chat template; its export gets the current one.
            if template_status(folder_chat_template(staged)) == "previous":
                write_chat_template(staged)
        model.save_pretrained(staged, safe_serialization=True, remote_code=remote_code,
                              model_card={**pretraining_facts(path), "name": out.name})
        if tok_src.is_dir():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_src / "tokenizer.json"))
            eos = stop_token_ids(tok)
            pad = tok.token_to_id(PAD)
        else:
            eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id)
            pad = config.pad_token_id
        # Stop at EOS and at the end of a chat turn, so a chat model stops after its answer.
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad).save_pretrained(staged)
        _readable(staged)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def _readable(folder: Path) -> None:
    """Give the export the permissions a plain mkdir would: mkdtemp makes it private to its owner."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pangu-pi export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder, run's checkpoints/ folder, or run folder")
    p.add_argument("out", metavar="OUT", help="folder for the HF checkpoint")
    p.add_argument("--dtype", help="weights' dtype: float32 | bfloat16 | float16 (default: the training precision)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-remote-code", action="store_true",
                   help="leave out configuration_pangu_pi.py / modeling_pangu_pi.py (loading then needs pangu-pi)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, force=args.force,
                            remote_code=not args.no_remote_code)
    print(f"exported {resolve_checkpoint(args.ckpt)} to {out}")
    return 0
