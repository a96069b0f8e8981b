"""Small, complete checkpoints for checking a serving setup end to end without downloading anything:
a PanGu-π whose SIAF and augmented shortcuts are active, a LLaMA of the same shape, and a peft LoRA
adapter for the PanGu-π.

Freshly initialised PanGu-π weights hide both of the model's additions: the shortcut's W2 starts at
zero and every SIAF term starts with the same slope. `build_pangu` moves them off those values so a
server that dropped or mis-wired either would give different tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

def _save_generation_config(out: Path, tokenizer) -> None:
    from pangu_pi.tokenizer import generation_config

    generation_config(tokenizer).save_pretrained(out)  # stops at </s> and <|im_end|>: a chat turn ends at either


@torch.no_grad()
def _activate_pangu_additions(model, generator: torch.Generator) -> None:
    for layer in model.model.layers:
        siaf = layer.mlp.siaf
        for param, centre, spread in ((siaf.scale, 1.0, 0.3), (siaf.shift, None, 0.3), (siaf.coef, 1.0, 0.3)):
            if param is None:
                continue
            noise = torch.randn(param.shape, generator=generator) * spread
            param.copy_((param if centre is None else torch.full_like(param, centre)) + noise)
        for shortcut in layer.augmented_shortcuts:
            shortcut.expand.weight.copy_(torch.randn(shortcut.expand.weight.shape, generator=generator) * 0.1)


@torch.no_grad()
def _sharpen(model, generator: torch.Generator, scale: float) -> None:
    # A model at init spreads its probability almost evenly over the vocabulary, so top tokens sit a
    # rounding error apart and greedy decoding is a coin toss between implementations. Larger output
    # embeddings give clear winners while keeping the function random.
    model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * scale)


def build_pangu(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, preset: str = "tiny",
                **config_overrides) -> Path:
    """Save a PanGu-π of `preset` ("tiny" unless named; the tokenizer's vocabulary) with its tokenizer into
    `out_dir`."""
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    config = PanGuPiConfig.from_preset(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = PanGuPiForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _activate_pangu_additions(model, generator)
    _sharpen(model, generator, scale=0.5)
    return _save(model, tokenizer, out_dir)


def build_llama_like(pangu_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a transformers LLaMA with the sizes of the PanGu-π in `pangu_dir` (no SIAF, no shortcut)."""
    from transformers import LlamaForCausalLM

    from pangu_pi import PanGuPiConfig
    from pangu_pi.conversion import llama_config_like
    from pangu_pi.tokenizer import load_tokenizer

    src = PanGuPiConfig.from_pretrained(str(pangu_dir))
    config = llama_config_like(src)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _sharpen(model, torch.Generator().manual_seed(seed + 1), scale=0.5)
    return _save(model, load_tokenizer(pangu_dir), out_dir)


def build_lora_adapter(base_dir: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 8) -> Path:
    """Save a peft LoRA adapter for the checkpoint in `base_dir`, with non-zero B so it changes outputs.

    The layout (adapter_config.json + adapter_model.safetensors) is the one `pangu-pi finetune`
    and any peft training run produce.
    """
    from peft import LoraConfig, get_peft_model

    from pangu_pi import PanGuPiForCausalLM

    base = PanGuPiForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: peft's default B = 0 would make a no-op adapter
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)  # strong enough to change greedy tokens, not so strong as to be noise
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


def _save(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _save_generation_config(out, tokenizer)
    return out
