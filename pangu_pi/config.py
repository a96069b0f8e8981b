"""`PanGuPiConfig`: the one description of a PanGu-π model that the HF model, the trainer and the
vLLM model all read.

Field names follow transformers' LLaMA config so that LLaMA tooling understands us; the PanGu-π
fields (prefixed `siaf_` and `shortcut_`) are documented where they are defined, with the paper's
number or the reason for our choice where the paper is silent (arXiv 2312.17276, "the paper").
"""

from __future__ import annotations

import difflib
from typing import Any

from transformers import PretrainedConfig

from .kernels import ACTIVATIONS

# RoPE variants: the ones transformers implements for LLaMA (its ROPE_INIT_FUNCTIONS) that vLLM's
# get_rope builds too. The formulas live in those libraries; the model only names the variant.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class ConfigError(ValueError):
    """A config that cannot describe a model. The message names the field and the fix."""


class PanGuPiConfig(PretrainedConfig):
    model_type = "pangu_pi"
    keys_to_ignore_at_inference = ["past_key_values"]

    # --- the LLaMA backbone (transformers' names) -------------------------------------------------
    vocab_size: int = 100883  # the paper's SentencePiece BPE vocabulary
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 29
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = multi-head attention (as many KV heads as heads)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # transformers' RoPE description: {"rope_type": one of ROPE_TYPES, "rope_theta", "factor", ...}.
    # `rope_theta` is kept in step with it; the legacy `rope_scaling` key is read into it.
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    # --- SIAF: series informed activation in the FFN (paper §4.2, Eq. 7) ---------------------------
    # The SwiGLU gate goes through Σ_{i=1..n} c_i·σ(a_i·z + b_i) instead of σ(z).
    siaf_terms: int = 2  # n; the paper picks n = 2 (Table 2: accuracy vs. latency)
    siaf_activation: str = "silu"  # σ; the paper leaves it open, SiLU is what SwiGLU's gate already uses
    # "channel": a_i, b_i (and c_i) per FFN channel, shape (n, intermediate_size), as in VanillaNet;
    # "scalar": one value per term, shape (n,). The paper does not say; per-channel costs 2n·width
    # parameters a layer (0.02 % at 7B) and lets each channel shape its own activation.
    siaf_param_shape: str = "channel"
    # Learn the outer weights c_i. False is the paper's Eq. 7 (c = 1); True is the VanillaNet form and
    # is what lets a LLaMA checkpoint convert with its function intact (c = (1, 0, …)).
    siaf_learn_weight: bool = False
    # "spread": a = 1, shifts b spread over [-1, 1] so the terms start different from each other;
    # "identity": c = (1, 0, …), a = 1, b = 0, the SIAF equals σ exactly (needs siaf_learn_weight).
    siaf_init: str = "spread"
    siaf_backend: str = "auto"  # kernel: auto | reference | compiled | triton (pangu_pi.kernels)

    # --- Augmented shortcut beside attention (paper §4.1, Eq. 4-5) --------------------------------
    # x + Attn(N(x)) + Σ_{i=1..T} W2_i·σ(W1_i·N(x)), each a bottleneck d → d/r → d.
    shortcut_count: int = 1  # T; the paper does not say, one keeps the cost at its Table 4 figure
    shortcut_ratio: int = 32  # r; paper Table 3 picks d/32 as the best accuracy/latency trade
    shortcut_activation: str = "gelu"  # σ; the paper names GELU as its example

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope = dict(kwargs.pop("rope_scaling", None) or self.rope_parameters or {})
        if "type" in rope:  # the pre-standard spelling of rope_type
            rope.setdefault("rope_type", rope.pop("type"))
        rope.setdefault("rope_type", "default")
        if "rope_theta" in rope:
            self.rope_theta = float(rope["rope_theta"])
        rope["rope_theta"] = self.rope_theta
        self.rope_parameters = rope
        # The attention implementation is left unset here, for transformers to resolve as it does for
        # its own models (SDPA where it is available, eager when output_attentions is asked for).
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Refuse a config that cannot build a model, naming the field and the fix."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
            f"({self.num_attention_heads}); pick a head count that divides it",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({self.num_key_value_heads}) for grouped-query attention",
        )
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        need(self.siaf_terms >= 1, f"siaf_terms must be at least 1, got {self.siaf_terms}")
        need(
            self.siaf_activation in ACTIVATIONS,
            f"siaf_activation {self.siaf_activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}",
        )
        need(
            self.siaf_param_shape in ("channel", "scalar"),
            f"siaf_param_shape must be 'channel' or 'scalar', got {self.siaf_param_shape!r}",
        )
        need(self.siaf_init in ("spread", "identity"),
             f"siaf_init must be 'spread' or 'identity', got {self.siaf_init!r}")
        need(
            self.siaf_init != "identity" or self.siaf_learn_weight or self.siaf_terms == 1,
            "siaf_init='identity' with several terms needs siaf_learn_weight=True (c = (1, 0, ...))",
        )
        need(self.shortcut_count >= 0, f"shortcut_count must be >= 0, got {self.shortcut_count}")
        need(
            self.shortcut_count == 0 or (self.shortcut_ratio >= 1 and self.hidden_size // self.shortcut_ratio >= 1),
            f"shortcut_ratio ({self.shortcut_ratio}) leaves no bottleneck width for hidden_size {self.hidden_size}",
        )
        need(
            self.shortcut_activation in ACTIVATIONS,  # the shortcut's σ is any of SIAF's activations
            f"shortcut_activation {self.shortcut_activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}",
        )
        self.check_rope()

    def check_rope(self) -> None:
        """Refuse a RoPE variant neither transformers nor vLLM builds, or one missing its parameters."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            close = difflib.get_close_matches(str(rope_type), ROPE_TYPES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"rope_parameters.rope_type {rope_type!r} is not supported; {hint}choose one of {', '.join(ROPE_TYPES)}"
            )
        try:
            self.validate_rope()  # transformers' own check of the keys each variant needs
        except (KeyError, ValueError, TypeError) as err:
            message = err.args[0] if err.args else str(err)
            raise ConfigError(f"rope_parameters for {rope_type!r}: {message}") from None
        factor = self.rope_parameters.get("factor")
        scaled = rope_type not in ("default", "longrope")  # longrope scales by its factor lists instead
        if scaled and not (isinstance(factor, (int, float)) and factor >= 1):
            raise ConfigError(f"rope_parameters.factor must be a number >= 1 for {rope_type!r} RoPE, got {factor!r}")

    @property
    def shortcut_width(self) -> int:
        return self.hidden_size // self.shortcut_ratio

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PanGuPiConfig":
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown preset {name!r}; {hint}known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return sorted(f for f in cls.__dataclass_fields__ if not f.startswith("_"))


# Presets. The paper gives depth, width and heads; we choose and document the rest:
# - FFN width: 7B takes LLaMA's 11008 (≈2.69·d), which lands the model at 6.7 B parameters, as the
#   paper's 7B; 1B takes 5632 (2.75·d), the expansion of the related 1B baselines (TinyLLaMA).
# - Context: 4096 positions for both, LLaMA 2's length.
# - Untied input and output embeddings, as LLaMA; tying the 1B would drop it to 0.83 B.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=8192,  # the size `pangu-pi tokenizer train` uses by default
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        shortcut_ratio=16,  # d/r = 8: keep the bottleneck from vanishing at this width
    ),
    "pangu-pi-1b": dict(
        vocab_size=100883,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        max_position_embeddings=4096,
    ),
    "pangu-pi-7b": dict(
        vocab_size=100883,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=29,
        num_attention_heads=32,
        max_position_embeddings=4096,
    ),
}
