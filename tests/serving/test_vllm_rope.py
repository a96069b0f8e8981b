"""RoPE scaling in the vLLM model: vLLM's `get_rope` rotates queries and keys as the HF model's
transformers RoPE does, for every variant, and an engine serving a YaRN-scaled checkpoint answers
with the HF model's greedy tokens past the original window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.modeling import PanGuPiRotaryEmbedding, apply_rotary

WINDOW = 16
VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": WINDOW,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0] * 16,
        "long_factor": [3.0] * 16,
        "original_max_position_embeddings": WINDOW,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def _config(rope):
    max_positions = WINDOW if rope and rope["rope_type"] in ("dynamic", "linear") else 4 * WINDOW
    return PanGuPiConfig.from_preset(
        "tiny", max_position_embeddings=max_positions, rope_theta=500.0, rope_parameters=rope
    )


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_vllm_rope_rotates_as_the_hf_model(kind, monkeypatch):
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config

    if kind == "longrope":
        # vLLM's LongRoPE reads the engine's max_model_len (past the original window it keeps the long
        # factors for every position, as transformers does for such a sequence).
        import vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope as longrope

        engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4 * WINDOW))
        monkeypatch.setattr(longrope, "get_current_vllm_config", lambda: engine)
    with set_current_vllm_config(VllmConfig()):
        import pangu_pi.serving.vllm_model as vllm_model

        config = _config(VARIANTS[kind])
        max_position, rope = vllm_model.rope_for_vllm(config)
        rotary = vllm_model.get_rope(
            config.head_dim, max_position=max_position, rope_parameters=rope, is_neox_style=True
        )
        # Every position vLLM serves (the extended window).
        length = rotary.cos_sin_cache.shape[0] if hasattr(rotary, "cos_sin_cache") else max_position
        assert length > WINDOW
        heads, dim = config.num_attention_heads, config.head_dim
        q, k = torch.randn(length, heads * dim), torch.randn(length, heads * dim)
        positions = torch.arange(length)
        rotate = getattr(rotary, "forward_native", rotary.forward)  # LongRoPE is a plain module
        vq, vk = rotate(positions, q.clone(), k.clone())

    hf = PanGuPiRotaryEmbedding(config)
    # The whole window at once: transformers' dynamic NTK then uses the length vLLM fixes for all.
    cos, sin = hf(q.view(1, length, heads, dim), positions.unsqueeze(0))
    hq, hk = apply_rotary(
        q.view(1, length, heads, dim).transpose(1, 2), k.view(1, length, heads, dim).transpose(1, 2), cos, sin
    )
    torch.testing.assert_close(vq.view(length, heads, dim), hq[0].transpose(0, 1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(vk.view(length, heads, dim), hk[0].transpose(0, 1), atol=2e-5, rtol=1e-5)


ENGINE = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=64,
              max_num_seqs=4, seed=0)
    params = SamplingParams(max_tokens=n, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    rows = [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for o in outs]
    print("RESULT " + json.dumps(rows))
    """
)


@pytest.mark.slow
def test_engine_with_yarn_scaling_gives_the_hf_greedy_tokens(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vr")  # short: vLLM's IPC socket paths must fit in 107 characters
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset(
        "tiny",
        vocab_size=512,
        max_position_embeddings=4 * WINDOW,
        rope_theta=500.0,
        rope_parameters=VARIANTS["yarn"],
        siaf_backend="reference",
    )
    model = PanGuPiForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.augmented_shortcuts[0].expand.weight.normal_(0, 0.05)
            # Sharp attention, so positions (and their scaling) decide the answers.
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
        model.model.embed_tokens.weight.normal_(0, 1.0)  # a peaked output, so greedy steps are far from ties
    folder = tmp_path / "yarn"
    model.save_pretrained(folder, model_card=False)
    prompts = [[(7 * i + 3) % 500 + 5 for i in range(WINDOW + 4)], [(11 * i + 1) % 500 + 5 for i in range(9)]]
    new = 32  # both sequences run past the original 16-position window

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", ENGINE, str(folder), json.dumps(prompts), str(new)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    served = json.loads(lines[-1][len("RESULT ") :])

    unscaled = PanGuPiForCausalLM(PanGuPiConfig(**{**config.to_dict(), "rope_parameters": None})).eval()
    unscaled.load_state_dict(model.state_dict())
    differs = False
    for prompt, row in zip(prompts, served):
        ids = torch.tensor([prompt])
        kwargs = dict(
            attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        expected = model.generate(ids, **kwargs)[0, len(prompt) :].tolist()
        assert row["tokens"] == expected
        with torch.no_grad():
            logits = model(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1 : -1]
        hf_logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(expected)[:, None])[:, 0]
        assert row["logprobs"] == pytest.approx(hf_logprobs.tolist(), abs=2e-3)
        differs |= unscaled.generate(ids, **kwargs)[0, len(prompt) :].tolist() != expected
    assert differs, "the scaling must change the greedy answers for the parity to mean something"
