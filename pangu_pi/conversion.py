"""LLaMA → PanGu-π: start continued pretraining from any transformers LLaMA checkpoint.

Every LLaMA weight keeps its name and value. The new parts start as identities, so the converted
model computes exactly what the source did: the SIAF is Σ c_i·σ(a_i·z + b_i) with c = (1, 0, …),
a = 1, b = 0 (the learned-c form of paper Eq. 7), and each augmented shortcut's W2 is zero.
Training then moves them away from the identity.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from .config import PanGuPiConfig
from .errors import UserError
from .folders import is_checkpoint
from .modeling import PanGuPiForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spm.model",
    "chat_template.jinja",
    "generation_config.json",
)


def pangu_config_from_llama(llama_config, siaf_terms: int = 2, shortcut_count: int = 1, **overrides) -> PanGuPiConfig:
    """The PanGu-π config with the LLaMA's shapes and SIAF/shortcut set up to start as identities."""
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(llama_config, flag, False):
            raise UserError(f"the source sets {flag}=True; PanGu-π projections have no biases, so it cannot convert")
    rope = dict(getattr(llama_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    from .config import ROPE_TYPES

    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"the source uses RoPE {rope_type!r}, which PanGu-π does not build; supported: {', '.join(ROPE_TYPES)}"
        )
    act = llama_config.hidden_act
    from .kernels import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise UserError(f"the source's activation {act!r} has no SIAF counterpart; supported: {sorted(ACTIVATIONS)}")
    fields = dict(
        vocab_size=llama_config.vocab_size,
        hidden_size=llama_config.hidden_size,
        intermediate_size=llama_config.intermediate_size,
        num_hidden_layers=llama_config.num_hidden_layers,
        num_attention_heads=llama_config.num_attention_heads,
        num_key_value_heads=llama_config.num_key_value_heads,
        head_dim=getattr(llama_config, "head_dim", None),
        max_position_embeddings=llama_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(llama_config, "rope_theta", 10000.0))),
        # The source's RoPE variant and its scaling, unchanged, so long-context LLaMAs keep their positions.
        rope_parameters={**rope, "rope_type": rope_type},
        rms_norm_eps=llama_config.rms_norm_eps,
        tie_word_embeddings=bool(llama_config.tie_word_embeddings),
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
        pad_token_id=llama_config.pad_token_id,
        siaf_terms=siaf_terms,
        siaf_activation=act,
        siaf_learn_weight=True,
        siaf_init="identity",
        shortcut_count=shortcut_count,
    )
    # Keep at least one bottleneck channel when a small model meets the paper's ratio of 32.
    fields["shortcut_ratio"] = min(32, llama_config.hidden_size)
    fields.update(overrides)
    return PanGuPiConfig(**fields)


def llama_config_like(config: PanGuPiConfig):
    """The transformers LLaMA config with `config`'s shapes: PanGu-π without SIAF and shortcuts.

    The baseline that parity tests, benchmarks and diagnostics compare against.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def convert_llama_model(llama_model, **config_overrides) -> PanGuPiForCausalLM:
    """A PanGu-π model holding `llama_model`'s weights, equal to it in function."""
    config = pangu_config_from_llama(llama_model.config, **config_overrides)
    model = PanGuPiForCausalLM(config).to(next(llama_model.parameters()).dtype)
    source = llama_model.state_dict()
    missing, unexpected = model.load_state_dict(source, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise UserError(f"the source has weights PanGu-π does not know: {unexpected[:5]}")
    new = ("augmented_shortcuts", "siaf")
    left = [k for k in missing if not any(part in k for part in new) and k != "lm_head.weight"]
    if left:
        raise UserError(f"the source lacks weights PanGu-π needs: {left[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    elif "lm_head.weight" in missing:
        raise UserError("the source has untied embeddings but no lm_head.weight")
    return model


def convert_llama(src: str | Path, out: str | Path, dtype: str | None = None, *, remote_code: bool = True,
                  force: bool = False, **config_overrides) -> Path:
    """Write the PanGu-π conversion of the LLaMA checkpoint in `src` into `out`: a new or empty folder,
    or (with `force`, or the same settings) one this function wrote before (pangu_pi.outputs)."""
    from transformers import AutoConfig, LlamaForCausalLM

    from .outputs import claim_output, folder_fingerprint, staged_output

    src, out = Path(src), Path(out)
    if not is_checkpoint(src):
        raise UserError(f"{src} holds no transformers checkpoint (config.json missing)")
    src_config = AutoConfig.from_pretrained(src)
    if src_config.model_type != "llama":
        raise UserError(f"{src} is a {src_config.model_type!r} checkpoint; convert-llama reads LLaMA checkpoints")
    pangu_config_from_llama(src_config, **config_overrides)  # refuse what cannot convert before reading weights
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"{out} is inside the source checkpoint {src}; write the conversion to a folder of its own")
    claim = claim_output(out, "convert-llama", {"src": folder_fingerprint(src), "dtype": dtype,
                                                "remote_code": remote_code, **config_overrides},
                         force=force, earlier="checkpoint")
    torch_dtype = getattr(torch, dtype) if dtype else None
    llama = LlamaForCausalLM.from_pretrained(src, dtype=torch_dtype or "auto")
    model = convert_llama_model(llama, **config_overrides)
    with staged_output(claim) as staged:
        for name in TOKENIZER_FILES:  # before the weights, so the model card describes the tokenizer
            if (src / name).exists():
                shutil.copy(src / name, staged / name)
        model.save_pretrained(staged, remote_code=remote_code,
                              model_card={"kind": "conversion from LLaMA (new parts start as identities)",
                                          "base_model": str(src), "name": out.name})
    return out


def convert_main(argv: list[str]) -> int:
    from .outputs import add_force_argument
    from .remote_code import add_no_remote_code_argument

    ap = argparse.ArgumentParser(
        prog="pangu-pi convert-llama",
        description="Convert a transformers LLaMA checkpoint into a PanGu-π checkpoint with equal logits.",
    )
    ap.add_argument("src", help="folder of a transformers LLaMA checkpoint")
    ap.add_argument("out", help="folder for the PanGu-π checkpoint")
    ap.add_argument("--siaf-terms", type=int, default=2, help="n, the SIAF's number of terms (paper: 2)")
    ap.add_argument("--shortcuts", type=int, default=1, help="T, augmented shortcuts per block")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the source's")
    add_no_remote_code_argument(ap)
    add_force_argument(ap, "a conversion")
    args = ap.parse_args(argv)
    out = convert_llama(args.src, args.out, args.dtype, remote_code=not args.no_remote_code, force=args.force,
                        siaf_terms=args.siaf_terms, shortcut_count=args.shortcuts)
    print(f"PanGu-π checkpoint written to {out}")
    return 0
