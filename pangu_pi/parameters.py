"""How many parameters a PanGu-π has, from its config alone.

Counted by formula, not by building the model: under ZeRO-3 a built model's tensors are empty, and a
7B model should be sized before it is allocated. tests/pangu_pi/test_parameters.py holds the formula
to a model built on the meta device for configs that differ in every field the count depends on.
"""

from __future__ import annotations


def count_parameters(config) -> dict[str, int]:
    """Parameters of the `PanGuPiForCausalLM` that `config` (a PanGuPiConfig) describes, by part, and
    their sum under "total"."""
    d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    siaf_shape = f if config.siaf_param_shape == "channel" else 1
    siaf = config.siaf_terms * siaf_shape * (3 if config.siaf_learn_weight else 2)
    per_layer = {
        "attention": 2 * d * q + 2 * d * kv,
        "shortcuts": config.shortcut_count * 2 * d * config.shortcut_width,
        "mlp": 3 * d * f,
        "siaf": siaf,
        "norms": 2 * d,
    }
    counts = {name: L * n for name, n in per_layer.items()}
    counts["embedding"] = V * d
    counts["lm_head"] = 0 if config.tie_word_embeddings else V * d
    counts["final_norm"] = d
    counts["total"] = sum(counts.values())
    return counts
