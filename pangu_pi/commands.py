"""Small `pangu-pi` subcommands over the model package: info, tokenizer, generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UserError
from .folders import has_tokenizer, is_checkpoint
from .outputs import add_force_argument
from .overrides import add_set_argument
from .remote_code import add_no_remote_code_argument


def parse_overrides(pairs: list[str]) -> dict:
    """Model-config overrides from `--set KEY=VALUE` items, read as every command reads `--set`
    (pangu_pi.overrides: VALUE is YAML). KEY is a model field, bare (`hidden_size=64`) or as it is
    written in a run config (`model.hidden_size=64`); an unknown field names the nearest one."""
    import difflib

    from .config import PanGuPiConfig
    from .overrides import apply_overrides

    tree = apply_overrides({}, list(pairs))
    model = tree.pop("model", None)
    out = dict(tree)
    if isinstance(model, dict):
        out.update(model)
    elif model is not None:
        raise UserError(f"--set model={model!r}: name a field, e.g. --set model.hidden_size=64")
    fields = PanGuPiConfig.field_names()
    for key, value in out.items():
        # rope_parameters is itself a mapping (--set model.rope_parameters.factor=4.0); no other field is.
        if key not in fields or (isinstance(value, dict) and key != "rope_parameters"):
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {'model.' + close[0]!r}?" if close else "; see `pangu-pi info --preset tiny`"
            raise UserError(f"unknown config key {'model.' + str(key)!r}{hint}")
    return out


def info_main(argv: list[str]) -> int:
    from .config import PanGuPiConfig
    from .parameters import count_parameters

    ap = argparse.ArgumentParser(prog="pangu-pi info", description="Print a preset's config and parameter count.")
    ap.add_argument("--preset", required=True, help="tiny | pangu-pi-1b | pangu-pi-7b")
    add_set_argument(ap, "override model fields, e.g. model.hidden_size=64 (as in run configs); several pairs "
                         "after one --set, or --set repeated")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    config = PanGuPiConfig.from_preset(args.preset, **overrides)
    params = count_parameters(config)["total"]
    if args.json:
        print(json.dumps({"preset": args.preset, "parameters": params, "config": config.to_diff_dict()}, indent=2))
    else:
        print(config.to_json_string(use_diff=False).strip())
        print(f"parameters: {params:,} ({params / 1e9:.3f} B)")
    return 0


def tokenizer_main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "extend", "template"):
        raise UserError("usage: pangu-pi tokenizer train|extend|template ...")
    if argv[0] == "template":
        return template_main(argv[1:])
    if argv[0] == "extend":
        from .vocab import extend_main

        return extend_main(argv[1:])
    from .tokenizer import load_tokenizer, train_tokenizer

    ap = argparse.ArgumentParser(prog="pangu-pi tokenizer train", description="Train a SentencePiece BPE tokenizer.")
    ap.add_argument("--input", nargs="*", help="text files, directories or globs (default: the embedded corpus)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-bytes", type=int, default=8_000_000, help="text sampled for training")
    ap.add_argument("--out", required=True, help="folder to write (new or empty; the same settings reuse it)")
    add_force_argument(ap, "a tokenizer")
    args = ap.parse_args(argv[1:])
    try:
        out = train_tokenizer(args.input, args.out, args.vocab_size, args.max_bytes, force=args.force)
    except ValueError as err:
        raise UserError(str(err)) from None
    tok = load_tokenizer(out)
    print(f"tokenizer with {len(tok)} pieces written to {out}")
    return 0


def template_main(argv: list[str]) -> int:
    """`pangu-pi tokenizer template DIR...`: install the current chat template (tools included)."""
    from .tokenizer import folder_chat_template, template_status, write_chat_template

    ap = argparse.ArgumentParser(
        prog="pangu-pi tokenizer template",
        description="Install the current chat template (ChatML with Hermes-style tool calls) in tokenizer or "
        "checkpoint folders. A custom template is kept as chat_template.previous.jinja.",
    )
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="tokenizer folder or checkpoint folder holding one")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a folder's template is not current")
    args = ap.parse_args(argv)
    stale = 0
    for folder in args.dirs:
        path = Path(folder)
        if not has_tokenizer(path):
            raise UserError(f"{folder} holds no tokenizer (no tokenizer.json); pass a tokenizer or checkpoint folder")
        if args.check:
            status = template_status(folder_chat_template(path))
            stale += status != "current"
            print(f"{folder}: {status} chat template")
            continue
        before = write_chat_template(path)
        print(f"{folder}: " + {
            "current": "chat template already current",
            "previous": "chat template updated (tools, tool calls and tool results now render)",
            "missing": "chat template written (there was none)",
            "custom": "custom chat template replaced; the old one is in chat_template.previous.jinja",
        }[before])  # fmt: skip
    return 1 if stale else 0


def generate_main(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401  (registers the Auto classes)

    from .tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(prog="pangu-pi generate", description="Generate text from a checkpoint.")
    ap.add_argument("model")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not is_checkpoint(args.model):
        raise UserError(f"{args.model} holds no checkpoint (config.json missing)")
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    torch.manual_seed(args.seed)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    sample = args.temperature > 0
    out = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        pad_token_id=tok.pad_token_id,
    )
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def init_main(argv: list[str]) -> int:
    """Write a freshly initialised checkpoint for a preset, sized to a tokenizer's vocabulary."""
    import torch

    from .config import PanGuPiConfig
    from .modeling import PanGuPiForCausalLM
    from .outputs import claim_output, staged_output
    from .tokenizer import generation_config, load_tokenizer, tokenizer_hash

    ap = argparse.ArgumentParser(prog="pangu-pi init", description="Create a randomly initialised checkpoint.")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder; sets vocab_size")
    add_set_argument(ap, "override model fields, e.g. model.hidden_size=64 (as in run configs); several pairs "
                         "after one --set, or --set repeated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder to write (new or empty)")
    add_force_argument(ap, "a checkpoint")
    add_no_remote_code_argument(ap)
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    overrides = parse_overrides(args.set)
    config = PanGuPiConfig.from_preset(
        args.preset,
        **{"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **overrides},
    )
    claim = claim_output(args.out, "init", {
        "preset": args.preset, "tokenizer": tokenizer_hash(args.tokenizer), "set": overrides, "seed": args.seed,
        "remote_code": not args.no_remote_code,
    }, force=args.force, earlier="checkpoint")
    torch.manual_seed(args.seed)
    model = PanGuPiForCausalLM(config)
    model.generation_config = generation_config(tok, bos_token_id=config.bos_token_id)
    with staged_output(claim) as staged:
        tok.save_pretrained(staged)  # first, so the model card describes it
        model.save_pretrained(staged, remote_code=not args.no_remote_code, model_card={"name": claim.out.name})
    params = model.num_parameters()
    print(f"{args.preset} model, {params:,} parameters, written to {args.out}")
    return 0
