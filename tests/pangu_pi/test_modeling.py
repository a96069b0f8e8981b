"""The model's numeric gates: LLaMA parity, save/load, KV cache, attention backends, checkpointing."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.conversion import llama_config_like
from pangu_pi.modeling import PanGuPiShortcut

TINY = dict(siaf_backend="reference")


def tiny_model(seed=0, **overrides) -> PanGuPiForCausalLM:
    torch.manual_seed(seed)
    return PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", **{**TINY, **overrides})).eval()


def perturb_new_parts(model: PanGuPiForCausalLM, seed=1) -> None:
    """Move SIAF and shortcut weights off their initial values so tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "siaf" in name or "augmented_shortcuts" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def llama_twin(config: PanGuPiConfig) -> LlamaForCausalLM:
    llama_config = llama_config_like(config)
    llama_config._attn_implementation = "eager"
    return LlamaForCausalLM(llama_config).eval()


def test_with_identity_siaf_and_no_shortcut_it_is_llama():
    model = tiny_model(siaf_learn_weight=True, siaf_init="identity", shortcut_count=0)
    model.config._attn_implementation = "eager"
    llama = llama_twin(model.config)
    llama.load_state_dict({k: v for k, v in model.state_dict().items() if ".siaf." not in k})
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-5


def test_new_model_starts_with_zero_shortcuts_and_distinct_siaf_terms():
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, PanGuPiShortcut):
            assert torch.count_nonzero(module.expand.weight) == 0
            assert module.squeeze.weight.std() > 0
    siaf = model.model.layers[0].mlp.siaf
    assert siaf.scale.shape == (2, model.config.intermediate_size) and siaf.coef is None
    assert not torch.equal(siaf.shift[0], siaf.shift[1])


def test_ffn_computes_the_series_activation():
    model = tiny_model(siaf_terms=3, siaf_learn_weight=True)
    perturb_new_parts(model)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    s = mlp.siaf
    by_hand = sum(s.coef[i] * torch.nn.functional.silu(s.scale[i] * gate + s.shift[i]) for i in range(3))
    torch.testing.assert_close(mlp(x), mlp.down_proj(by_hand * up))


def test_shortcut_changes_the_output_once_trained():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[0].augmented_shortcuts[0].expand.weight.normal_()
        assert (model(ids).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("shape", ["channel", "scalar"])
def test_save_and_auto_load_give_identical_logits(tmp_path, shape):
    model = tiny_model(siaf_param_shape=shape, shortcut_count=2)
    perturb_new_parts(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PanGuPiForCausalLM
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_greedy_generation_is_the_same_with_and_without_kv_cache():
    model = tiny_model()
    perturb_new_parts(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, uncached)


def test_padded_batch_generation_matches_single_prompts():
    model = tiny_model()
    perturb_new_parts(model)
    short, long = torch.randint(4, 100, (1, 4)), torch.randint(4, 100, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])  # left padding
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 9:]
    assert torch.equal(together[0], model.generate(short, **kwargs)[0, 4:])
    assert torch.equal(together[1], model.generate(long, **kwargs)[0, 9:])


def test_attention_backends_agree():
    """eager (the reference) and SDPA agree here; flash-attn needs CUDA and is checked only on a GPU."""
    model = tiny_model()
    perturb_new_parts(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 31))
    outputs = {}
    for backend in ("eager", "sdpa"):
        model.config._attn_implementation = backend
        with torch.no_grad():
            outputs[backend] = model(ids).logits
    assert (outputs["eager"] - outputs["sdpa"]).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs CUDA")
def test_flash_attention_agrees_with_eager_on_gpu():
    pytest.importorskip("flash_attn")
    model = tiny_model().cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    outputs = {}
    for backend in ("eager", "flash_attention_2"):
        model.config._attn_implementation = backend
        with torch.no_grad():
            outputs[backend] = model(ids).logits.float()
    assert (outputs["eager"] - outputs["flash_attention_2"]).abs().max() <= 5e-2


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 8192, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        perturb_new_parts(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_new_parameter_names_do_not_collide_with_llama_names():
    llama_parts = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                   "post_attention_layernorm")  # fmt: skip
    names = [n for n, _ in tiny_model().named_parameters()]
    new = [n for n in names if "siaf" in n or "augmented_shortcuts" in n]
    assert new and not [n for n in new if any(part in n for part in llama_parts)]
