"""The model API as transformers' own models offer it: attention weights and hidden states collected
per layer, `return_dict`, the attention implementation resolved by transformers, assisted decoding,
static cache and a compiled generation loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM


def tiny(seed=0, **overrides) -> PanGuPiForCausalLM:
    torch.manual_seed(seed)
    model = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", **{"siaf_backend": "reference", **overrides}))
    with torch.no_grad():  # move the zero-initialised shortcuts so they take part
        for layer in model.model.layers:
            for shortcut in layer.augmented_shortcuts:
                shortcut.expand.weight.normal_(0, 0.02)
    return model.eval()


IDS = torch.tensor([[5, 17, 99, 4, 250, 31, 7, 64, 12], [8, 2, 45, 300, 11, 6, 90, 3, 1]])


def test_attention_implementation_is_left_for_transformers_to_resolve():
    config = PanGuPiConfig.from_preset("tiny")
    assert config._attn_implementation is None  # nothing fixed in the config
    assert tiny().config._attn_implementation == "sdpa"  # what transformers picks on this machine
    config.output_attentions = True  # as LLaMA's config: asking for weights switches to eager
    assert config._attn_implementation == "eager"
    assert PanGuPiForCausalLM(config).config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="output_attentions"):
        tiny().config.output_attentions = True  # sdpa already chosen: refused, as transformers does


def test_attention_weights_are_returned_per_layer_and_are_the_softmax():
    model = tiny(attn_implementation="eager")
    with torch.no_grad():
        out = model(IDS, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    weights = out.attentions[0]
    assert weights.shape == (2, 4, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
    assert torch.all(weights.triu(1) == 0)  # causal: nothing attends ahead
    assert model(IDS).attentions is None


def test_sdpa_falls_back_to_eager_when_weights_are_asked_for():
    model = tiny()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(IDS, output_attentions=True)
        model.config._attn_implementation = "eager"
        eager = model(IDS, output_attentions=True)
    assert len(sdpa.attentions) == 4
    for a, b in zip(sdpa.attentions, eager.attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=0)


def test_hidden_states_from_the_call_and_from_the_config(tmp_path):
    model = tiny()
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        base = model.model(IDS)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(IDS))
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)  # the normed output, as LLaMA
    model.save_pretrained(tmp_path, model_card=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, output_hidden_states=True).eval()
    with torch.no_grad():
        from_config = loaded(IDS)
    assert from_config.hidden_states is not None and len(from_config.hidden_states) == 5
    torch.testing.assert_close(from_config.hidden_states[2], out.hidden_states[2])


def test_return_dict_false_from_the_call_and_from_the_config():
    model = tiny()
    with torch.no_grad():
        logits, cache = model(IDS, return_dict=False)
        loss, logits2 = model(IDS, labels=IDS, use_cache=False, return_dict=False)[:2]
        model.config.return_dict = False
        as_tuple = model(IDS, use_cache=False)
        base = model.model(IDS, use_cache=False)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 9, model.config.vocab_size)
    assert cache.get_seq_length() == 9
    assert loss.dim() == 0 and torch.equal(logits, logits2)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], logits)
    assert isinstance(base, tuple) and base[0].shape == (2, 9, model.config.hidden_size)


def test_generate_returns_attentions_and_hidden_states():
    model = tiny(attn_implementation="eager")
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True,
                         output_hidden_states=True, return_dict_in_generate=True)
    assert len(out.attentions) == 3 and len(out.attentions[0]) == 4
    assert out.attentions[0][0].shape == (2, 4, 9, 9) and out.attentions[1][0].shape == (2, 4, 1, 10)
    assert len(out.hidden_states) == 3 and len(out.hidden_states[0]) == 5


def test_assisted_decoding_gives_the_greedy_tokens():
    model = tiny()
    assistant = tiny(seed=1, num_hidden_layers=1)
    prompt = IDS[:1]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = model.generate(prompt, **kwargs)
    assisted = model.generate(prompt, assistant_model=assistant, **kwargs)
    assert torch.equal(plain, assisted)
    with_weights = model.generate(prompt, assistant_model=assistant, output_attentions=True,
                                  return_dict_in_generate=True, **kwargs)
    assert torch.equal(with_weights.sequences, plain) and all(step[0] is not None for step in with_weights.attentions)


def test_static_cache_and_compiled_generation_give_the_greedy_tokens():
    model = tiny(siaf_backend="auto")  # the compiled SIAF kernel outside the graph, the plain op inside it
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(IDS, **kwargs)
    static = model.generate(IDS, cache_implementation="static", **kwargs)
    assert torch.equal(plain, static)
    # fullgraph=True fails on any graph break; the eager backend keeps the check to tracing alone.
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    compiled = model.generate(IDS, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert hasattr(model, "_compiled_call")  # generation did take the compiled path
    assert torch.equal(plain, compiled)
