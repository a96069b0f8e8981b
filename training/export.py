"""`pangu-pi export CKPT OUT`: a training checkpoint as an HF checkpoint.

ZeRO keeps the fp32 weights in per-rank partitions; DeepSpeed's zero_to_fp32 gathers them into one
state dict, which becomes a `PanGuPiForCausalLM` saved as safetensors with its config, the tokenizer
the data was made with, and a generation config that stops at EOS and at the chat turn end.
`AutoModelForCausalLM.from_pretrained(OUT)` (after `import pangu_pi`, or with trust_remote_code=True where
only transformers is installed) and the serving layer load it; README.md is its model card.

CKPT may be a checkpoint folder (`OUT/checkpoints/step_N`), a run's `checkpoints/` folder or the run
folder itself (the newest complete checkpoint is taken).

OUT is a new or empty folder, or an export written before (pangu_pi.outputs): the same checkpoint
and settings write it again, others need `--force`, which replaces only the export's own files. A
folder the export did not write is refused, and so is an OUT inside the run, `--force` or not.
Reading the DeepSpeed files runs `torch.load(weights_only=False)`: a checkpoint no run of its folder
wrote gets a warning (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
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


def _run_of(checkpoint: Path) -> Path:
    """The run folder holding `checkpoint`; the checkpoint folder itself when it stands alone."""
    return layout.run_of(checkpoint) if checkpoint.parent.name == layout.CHECKPOINTS else checkpoint


def untrusted_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` may not be the user's own run's, or None. Its DeepSpeed files are pickles, read
    with torch.load(weights_only=False): loading one runs any code it holds."""
    import json

    from .run_folder import read_marker

    run = _run_of(checkpoint)
    marker = read_marker(run)
    try:
        state = json.loads((checkpoint / layout.TRAINER_STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if marker is None or not marker.get("run_id"):
        return f"{run} carries no run marker ({layout.RUN_MARKER}) of the run that wrote it"
    if state.get("run_id") != marker["run_id"]:
        return f"no run of {run} wrote it (its run id is not the folder's)"
    owner = (checkpoint / layout.TRAINER_STATE).stat().st_uid if (checkpoint / layout.TRAINER_STATE).exists() else None
    if owner is not None and hasattr(os, "getuid") and owner != os.getuid():
        return f"its files belong to another user (uid {owner})"
    return None


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                      force: bool = False, remote_code: bool = True) -> Path:
    """Write an HF checkpoint of `ckpt` into `out` (created whole, or not at all). Returns `out`.

    With `remote_code` (the default) the folder carries its own code and loads in transformers alone
    with trust_remote_code=True; its README.md model card states what the run knew at that step."""
    import torch
    from transformers import GenerationConfig

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.outputs import claim_output, staged_output
    from pangu_pi.tokenizer import folder_chat_template, generation_config, template_status, write_chat_template

    path = resolve_checkpoint(ckpt)
    out = Path(out)
    run = _run_of(path)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise UserError(f"OUT {out} is inside the run folder {run} it would export from; write the export to a "
                        "folder outside the run (--force does not change this)")
    config_file = path / layout.MODEL_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no model/config.json; it was not written by `pangu-pi pretrain`")
    if dtype is None:
        dtype = "bfloat16" if _training_precision(path) == "bf16" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; choose one of float32, bfloat16, float16")
    torch_dtype = getattr(torch, DTYPES[dtype])
    claim = claim_output(out, "export", {"checkpoint": str(path.resolve()), "dtype": DTYPES[dtype],
                                         "remote_code": remote_code}, force=force, earlier="checkpoint")
    reason = untrusted_reason(path)
    if reason is not None:
        print(f"pangu-pi export: warning: {path}: {reason}. Its DeepSpeed files are read with "
              "torch.load(weights_only=False), which runs any code hidden in them: export only checkpoints "
              "you trust (docs/security.md)", file=sys.stderr)

    config = PanGuPiConfig.from_json_file(str(config_file))
    config.use_cache = True  # off while training; generation wants it
    with torch.device("meta"):
        expected = set(PanGuPiForCausalLM(config).state_dict())
    state = {k: v.to(torch_dtype) for k, v in consolidated_state_dict(path, expected).items()}
    model = PanGuPiForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype)

    with staged_output(claim) as staged:
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

            # Stop at EOS and at the end of a chat turn, so a chat model stops after its answer.
            tok = Tokenizer.from_file(str(tok_src / "tokenizer.json"))
            generation_config(tok, bos_token_id=config.bos_token_id).save_pretrained(staged)
        else:
            eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id)
            GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                             pad_token_id=config.pad_token_id).save_pretrained(staged)
        _readable(staged)
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
    from pangu_pi.outputs import add_force_argument
    from pangu_pi.remote_code import add_no_remote_code_argument

    p = argparse.ArgumentParser(prog="pangu-pi export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder, run's checkpoints/ folder, or run folder")
    p.add_argument("out", metavar="OUT", help="folder for the HF checkpoint")
    p.add_argument("--dtype", help="weights' dtype: float32 | bfloat16 | float16 (default: the training precision)")
    add_force_argument(p, "an export")
    add_no_remote_code_argument(p)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, force=args.force,
                            remote_code=not args.no_remote_code)
    print(f"exported {resolve_checkpoint(args.ckpt)} to {out}")
    return 0
