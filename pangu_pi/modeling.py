"""PanGu-π (arXiv 2312.17276) as a transformers model.

A LLaMA decoder with two added nonlinearities, read top to bottom:

    RMSNorm → RoPE → attention + augmented shortcut → SIAF-gated FFN → block → model → LM head

Each block computes, with N the RMSNorm:

    h = x + Attn(N(x)) + Σ_{i=1..T} W2_i·σ(W1_i·N(x))             augmented shortcut (paper Eq. 4-5)
    y = h + W_down((Σ_{j=1..n} c_j·φ(a_j·W_gate N(h) + b_j)) ⊙ W_up N(h))   SIAF-gated FFN (Eq. 7)

Nothing here knows about parallelism: DeepSpeed and vLLM apply theirs from outside.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .config import PanGuPiConfig
from .kernels import siaf_and_mul
from .kernels.linear_cross_entropy import linear_cross_entropy
from .kernels.reference import ACTIVATIONS, identity_init, spread_init

logger = logging.get_logger(__name__)

class PanGuPiRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares of bf16 activations loses too much to be trusted.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PanGuPiRotaryEmbedding(nn.Module):
    """Rotary position embedding (half-split layout, as LLaMA, so LLaMA weights keep their meaning).

    Scaled variants (`rope_parameters["rope_type"]` linear, dynamic, yarn, longrope, llama3) take their
    frequencies and attention factor from transformers' own `ROPE_INIT_FUNCTIONS`, and the
    sequence-length dependent ones (dynamic, longrope) are updated by its `dynamic_rope_update`.
    """

    def __init__(self, config: PanGuPiConfig):
        super().__init__()
        self.config = config
        # Read by dynamic_rope_update: the window the model was trained for.
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        default = self.rope_type == "default"
        init_fn = self.compute_default_rope_parameters if default else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        # Not persistent: recomputed from the config, so checkpoints carry no RoPE tables.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PanGuPiConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        theta = config.rope_parameters.get("rope_theta", config.rope_theta)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device).float()  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: (B, 1, T, D)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out: the reference the SDPA and flash backends are checked against."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # grouped-query attention: share each KV head
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, probs


class PanGuPiAttention(nn.Module):
    """Multi-head self-attention with grouped KV heads and RoPE."""

    def __init__(self, config: PanGuPiConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        d, h, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)

    def forward(self, x, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        implementation = self.config._attn_implementation or "eager"
        if kwargs.get("output_attentions") and implementation != "eager":
            # SDPA and flash attention never form the weights; the caller asked for them, so this
            # call computes attention written out instead of returning nothing.
            logger.warning_once(
                f"attention weights were asked for but the {implementation!r} attention does not return them; "
                "computing these calls with eager attention (load with attn_implementation='eager' to avoid the switch)"
            )
            implementation = "eager"
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        out, weights = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return self.o_proj(out.reshape(B, T, -1)), weights


class PanGuPiShortcut(nn.Module):
    """One augmented shortcut T_i(x) = W2·σ(W1·x), a d → d/r → d bottleneck (paper Eq. 5, Table 3).

    W2 starts at zero, so a new shortcut adds nothing until training gives it a use: the block starts
    as the plain attention block, and a converted LLaMA keeps its function.
    """

    def __init__(self, config: PanGuPiConfig):
        super().__init__()
        self.squeeze = nn.Linear(config.hidden_size, config.shortcut_width, bias=False)  # W1
        self.expand = nn.Linear(config.shortcut_width, config.hidden_size, bias=False)  # W2
        self.expand.zero_init = True  # read by _init_weights, which visits this Linear after us
        self.act = ACTIVATIONS[config.shortcut_activation]  # σ from the same table as SIAF's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.act(self.squeeze(x)))


class PanGuPiSIAF(nn.Module):
    """The learned coefficients of Σ_i c_i·φ(a_i·z + b_i) (paper Eq. 7); the op is `siaf_and_mul`.

    `scale` is a, `shift` is b, `coef` is c (a parameter only when `siaf_learn_weight`; otherwise c = 1).
    """

    def __init__(self, config: PanGuPiConfig):
        super().__init__()
        n = config.siaf_terms
        shape = (n, config.intermediate_size) if config.siaf_param_shape == "channel" else (n,)
        self.activation = config.siaf_activation
        self.backend = config.siaf_backend
        self.init_kind = config.siaf_init
        self.scale = nn.Parameter(torch.empty(shape))
        self.shift = nn.Parameter(torch.empty(shape))
        self.coef = nn.Parameter(torch.empty(shape)) if config.siaf_learn_weight else None
        self.reset_parameters()

    def initial_values(self) -> tuple[list[float], list[float], list[float]]:
        n = self.scale.shape[0]
        return identity_init(n) if self.init_kind == "identity" else spread_init(n)

    def reset_parameters(self) -> None:
        a, b, c = self.initial_values()
        for param, values in ((self.scale, a), (self.shift, b), (self.coef, c)):
            if param is not None:
                column = torch.tensor(values, dtype=param.dtype, device=param.device)
                init.copy_(param, column.view(-1, *([1] * (param.dim() - 1))).expand_as(param))

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # Every backend is a torch.library op or plain torch, so torch.compile (fullgraph) of generation
        # traces this without a graph break; inside a graph "auto" picks per kernels/auto_table.py.
        return siaf_and_mul(
            gate, up, self.scale, self.shift, self.coef, activation=self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"terms={self.scale.shape[0]}, shape={tuple(self.scale.shape)}, act={self.activation}"


class PanGuPiMLP(nn.Module):
    """SwiGLU FFN whose gate goes through the SIAF instead of a single SiLU."""

    def __init__(self, config: PanGuPiConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.siaf = PanGuPiSIAF(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.siaf(self.gate_proj(x), self.up_proj(x)))


class PanGuPiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PanGuPiConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PanGuPiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PanGuPiAttention(config, layer_idx)
        # Beside attention only: the paper puts the augmented shortcut in the MSA block, not the FFN.
        self.augmented_shortcuts = nn.ModuleList(PanGuPiShortcut(config) for _ in range(config.shortcut_count))
        self.post_attention_layernorm = PanGuPiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PanGuPiMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        #   x ──┬── N ──┬── Attn ──────────┐
        #       │       ├── T_1 ... T_T ───┤
        #       └──────────────────────────+── h ──┬── N ── SIAF-FFN ──┐
        #                                          └───────────────────+── y
        x = hidden_states
        normed = self.input_layernorm(x)
        attn, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        h = x + attn
        for shortcut in self.augmented_shortcuts:
            # The shortcut reads the normalised stream, as in AugViT, so its scale does not drift with depth.
            h = h + shortcut(normed)
        return h + self.mlp(self.post_attention_layernorm(h))


class PanGuPiPreTrainedModel(PreTrainedModel):
    config_class = PanGuPiConfig
    config: PanGuPiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PanGuPiDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # What transformers' output capturing records per layer when output_hidden_states /
    # output_attentions are asked for, in the call or in the config.
    _can_record_outputs = {"hidden_states": PanGuPiDecoderLayer, "attentions": PanGuPiAttention}

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        *args,
        remote_code: bool | None = None,
        model_card: bool | dict = True,
        **kwargs,
    ):
        """transformers' save, then what makes the folder a checkpoint anyone can use.

        - `remote_code`: also write `configuration_pangu_pi.py`, `modeling_pangu_pi.py` and `auto_map`
          (pangu_pi/remote_code.py), so transformers alone loads the folder with trust_remote_code=True.
          None means yes unless the environment sets PANGU_PI_REMOTE_CODE=0.
        - `model_card`: write README.md (pangu_pi/model_card.py); a dict adds facts the caller knows
          about the run that made the weights (see `model_card.write_model_card`).
        Every pangu-pi writer (init, convert-llama, export, finetune, resize) saves through here.
        """
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if not is_main_process:
            return
        from . import model_card as card
        from . import remote_code as code

        if remote_code is None:
            remote_code = os.environ.get(code.ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")
        if remote_code:
            code.write_remote_code(save_directory)
        else:
            code.remove_remote_code(save_directory)
        if model_card:
            card.write_model_card(save_directory, self, run=model_card if isinstance(model_card, dict) else None)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        elif isinstance(module, PanGuPiSIAF):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class PanGuPiModel(PanGuPiPreTrainedModel):
    def __init__(self, config: PanGuPiConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PanGuPiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PanGuPiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = PanGuPiRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # Training never reads the cache; leaving it off also lets transformers see packed sequences
        # in position_ids and keep their examples from attending to each other.
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)

        mask_config = self.config
        if kwargs.get("output_attentions") and self.config._attn_implementation not in (None, "eager"):
            # The attention modules switch to eager for this call (see PanGuPiAttention), so the mask
            # must be eager's too: SDPA's may be None (is_causal) and flash attention's is 2-D.
            mask_config = copy.copy(self.config)
            mask_config._attn_implementation_internal = "eager"
        mask = create_causal_mask(
            config=mask_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        # Per-layer hidden states and attention weights are recorded by `capture_outputs` (hooks on
        # the decoder layers and attention modules), as in transformers' own models.
        for layer in self.layers:
            hidden = layer(
                hidden,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values if use_cache else None,
                # Attention backends that need the positions (flash attention's packed documents, a
                # sequence-parallel wrapper gathering them) read them here, as in transformers' models.
                position_ids=position_ids,
                **kwargs,
            )
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
        )


class PanGuPiForCausalLM(PanGuPiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # With labels, compute the loss with the fused LM head + cross-entropy (kernels/linear_cross_entropy.py)
    # and return no logits: the full-vocabulary logits are never formed. The trainer sets it
    # (`train.fused_loss`); it is not part of the config, so saved checkpoints do not carry it.
    fused_loss: bool = False

    def __init__(self, config: PanGuPiConfig):
        super().__init__(config)
        self.model = PanGuPiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # Labels already shifted (shift_labels[t] = the id of token t+1), as transformers' losses take them.
        shift_labels = kwargs.pop("shift_labels", None)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # a tuple, if asked for, is made once, here (can_return_tuple)
            **kwargs,
        )
        hidden = out.last_hidden_state
        if self.fused_loss and (labels is not None or shift_labels is not None):
            if shift_labels is None:  # labels[t] is token t's own id; the loss predicts the next one
                shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels,
                                        num_items_in_batch=kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                          hidden_states=out.hidden_states, attentions=out.attentions)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels.contiguous()  # transformers' loss views it flat
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
