"""PanGu-π for vLLM, built from vLLM's tensor-parallel layers so it shards, batches and pages its
KV cache like vLLM's own LLaMA; it loads the checkpoints `PanGuPiForCausalLM.save_pretrained` writes.

Differences from LLaMA, and how each shards under tensor parallelism (TP):
- SIAF-gated FFN: the gate/up projection is column-parallel, so every rank holds a slice of the FFN
  channels; per-channel SIAF coefficients (n, intermediate_size) are sliced the same way along
  dim 1, scalar ones (n,) are replicated.
- Augmented shortcut: W1 column-parallel (bottleneck channels split), activation, W2 row-parallel.
  Its partial sums and attention's o_proj partial sums are added before one all-reduce, so the
  shortcut costs no extra communication.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.logger import init_logger
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from pangu_pi import kernels
from pangu_pi.config import PanGuPiConfig
from pangu_pi.kernels.reference import ACTIVATIONS

SIAF_OP_NAME = "pangu_pi_siaf_and_mul"
logger = init_logger(__name__)


def _siaf_and_mul_fused(
    gate: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    # "auto": the kernels' table picks per call shape, and inside a CUDA graph capture the fused kernel.
    return kernels.siaf_and_mul(gate, up, scale, shift, weight, activation=activation, backend="auto")


def _siaf_and_mul_fake(gate, up, scale, shift, weight, activation):
    return torch.empty_like(up)


if current_platform.is_cuda_alike() and not hasattr(torch.ops.vllm, SIAF_OP_NAME):
    # An opaque torch op: vLLM's torch.compile graph keeps the Triton launch as one node
    # instead of tracing into the kernel's Python launcher.
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(SIAF_OP_NAME, _siaf_and_mul_fused, fake_impl=_siaf_and_mul_fake)


def rope_for_vllm(config: PanGuPiConfig) -> tuple[int, dict]:
    """(max_position, rope_parameters) for vLLM's `get_rope`, which builds every variant the HF model
    takes from transformers (PanGuPiConfig.check_rope refuses the rest).

    One variant cannot match transformers exactly: dynamic NTK. transformers rescales the base for each
    sequence by its own length; vLLM batches sequences of every length over one position table, so
    it applies the base transformers uses for a sequence of the whole extended window
    (max_position_embeddings × factor) to every request. Within the original window that differs
    from the HF model, which leaves such sequences unscaled; we say so once at load time.
    """
    from pangu_pi.config import ROPE_TYPES

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", config.rope_theta)
    kind = rope.setdefault("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"RoPE variant {kind!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    max_position = config.max_position_embeddings
    if kind == "dynamic":
        trained = config.max_position_embeddings
        max_position = int(trained * rope["factor"])
        rope["max_trained_positions"] = trained
        logger.warning(
            "dynamic NTK RoPE: vLLM applies the scaling of a %d-token sequence to every request; transformers "
            "scales each sequence by its own length (and not at all within %d tokens), so answers can differ",
            max_position,
            trained,
        )
    return max_position, rope


def _sharded_siaf_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy this rank's slice of the FFN channels of a per-channel SIAF coefficient (n, width)."""
    width = param.shape[1]
    rank = get_tensor_model_parallel_rank()
    if loaded.shape[1] != width * get_tensor_model_parallel_world_size():
        raise ValueError(
            f"SIAF coefficient has shape {tuple(loaded.shape)}; this model expects "
            f"({param.shape[0]}, {width * get_tensor_model_parallel_world_size()}) per-channel values"
        )
    param.data.copy_(loaded.narrow(1, rank * width, width))


@CustomOp.register(SIAF_OP_NAME)
class SIAFAndMul(CustomOp):
    """(Σ_i c_i·σ(a_i·gate + b_i)) ⊙ up over the concatenated [gate | up] of this rank's FFN channels.

    Holds a, b (and c when learnt) under the HF names scale, shift, coef, so `mlp.siaf.*` loads as is.
    """

    def __init__(self, config: PanGuPiConfig, tp_size: int):
        super().__init__()
        n = config.siaf_terms
        per_channel = config.siaf_param_shape == "channel"
        if per_channel and config.intermediate_size % tp_size:
            raise ValueError(
                f"intermediate_size {config.intermediate_size} does not split over {tp_size} tensor-parallel ranks"
            )
        shape = (n, config.intermediate_size // tp_size) if per_channel else (n,)
        self.activation = config.siaf_activation
        self.act = ACTIVATIONS[config.siaf_activation]
        self.scale = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.shift = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.coef = nn.Parameter(torch.empty(shape), requires_grad=False) if config.siaf_learn_weight else None
        if per_channel:
            for p in (self.scale, self.shift, self.coef):
                if p is not None:
                    set_weight_attrs(p, {"weight_loader": _sharded_siaf_loader})

    def _split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = gate_up.shape[-1] // 2
        return gate_up[..., :width], gate_up[..., width:]

    def forward_native(self, gate_up: torch.Tensor) -> torch.Tensor:
        # The same function as siaf_and_mul_reference (the unit tests hold them equal), computed for
        # all n terms at once on a (tokens, n, width) view: in a decode step on CPU each torch op
        # costs more in dispatch than in arithmetic, and the reference's per-term loop and per-call
        # shape checks would spend 2-3x the ops of this form.
        gate, up = self._split(gate_up)
        n = self.scale.shape[0]
        terms = self.act(torch.addcmul(self.shift.view(n, -1), gate.unsqueeze(-2), self.scale.view(n, -1)))
        if self.coef is not None:
            terms = terms * self.coef.view(n, -1)
        return terms.sum(-2) * up

    def forward_cuda(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = self._split(gate_up)
        op = getattr(torch.ops.vllm, SIAF_OP_NAME)
        return op(gate.contiguous(), up.contiguous(), self.scale, self.shift, self.coef, self.activation)

    def extra_repr(self) -> str:
        return f"terms={self.scale.shape[0]}, shape={tuple(self.scale.shape)}, act={self.activation}"


class PanGuPiMLP(nn.Module):
    def __init__(self, config: PanGuPiConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.siaf = SIAFAndMul(config, get_tensor_model_parallel_world_size())
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.siaf(gate_up))
        return out


class PanGuPiShortcut(nn.Module):
    """W2·σ(W1·x), d → d/r → d; returns this rank's partial sum (the caller all-reduces)."""

    def __init__(self, config: PanGuPiConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if config.shortcut_width % tp_size:
            raise ValueError(
                f"augmented shortcut width {config.shortcut_width} (hidden_size / shortcut_ratio) does not "
                f"split over {tp_size} tensor-parallel ranks; use a tensor-parallel size that divides it"
            )
        self.squeeze = ColumnParallelLinear(
            config.hidden_size,
            config.shortcut_width,
            bias=False,
            gather_output=False,
            quant_config=quant_config,
            prefix=f"{prefix}.squeeze",
        )
        self.expand = RowParallelLinear(
            config.shortcut_width,
            config.hidden_size,
            bias=False,
            input_is_parallel=True,
            reduce_results=False,
            quant_config=quant_config,
            prefix=f"{prefix}.expand",
        )
        self.act = ACTIVATIONS[config.shortcut_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.squeeze(x)
        out, _ = self.expand(self.act(hidden))
        return out


class PanGuPiAttention(nn.Module):
    def __init__(
        self,
        config: PanGuPiConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp_size:
            raise ValueError(f"{heads} attention heads do not split over {tp_size} tensor-parallel ranks")
        if kv_heads % tp_size and tp_size % kv_heads:
            raise ValueError(
                f"{kv_heads} key/value heads neither split over nor replicate across {tp_size} tensor-parallel ranks"
            )
        self.head_dim = config.head_dim
        self.num_heads = heads // tp_size
        self.num_kv_heads = max(1, kv_heads // tp_size)  # fewer KV heads than ranks: each rank keeps a copy
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            heads,
            kv_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            heads * self.head_dim,
            config.hidden_size,
            bias=False,
            reduce_results=False,  # summed with the shortcut's partial sums, then reduced once
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        max_position, rope_parameters = rope_for_vllm(config)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=max_position,
            rope_parameters=rope_parameters,
            is_neox_style=True,  # the HF model rotates half-split pairs, as LLaMA
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out  # a partial sum under TP


class PanGuPiDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.tp_size = get_tensor_model_parallel_world_size()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = PanGuPiAttention(config, vllm_config.cache_config, quant_config, f"{prefix}.self_attn")
        self.augmented_shortcuts = nn.ModuleList(
            PanGuPiShortcut(config, quant_config, f"{prefix}.augmented_shortcuts.{i}")
            for i in range(config.shortcut_count)
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PanGuPiMLP(config, quant_config, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's fused-residual pattern: `hidden_states` is the last branch output, not yet added;
        # `residual` is the stream before it. RMSNorm(h, r) returns (N(h + r), h + r).
        if residual is None:
            residual = hidden_states
            normed = self.input_layernorm(hidden_states)
        else:
            normed, residual = self.input_layernorm(hidden_states, residual)
        # Attention and the shortcuts both read N(x) and are both branches off the same stream x,
        # so the shortcuts join the attention branch, never the residual.
        branch = self.self_attn(positions, normed)
        for shortcut in self.augmented_shortcuts:
            branch = branch + shortcut(normed)
        if self.tp_size > 1:
            branch = tensor_model_parallel_all_reduce(branch)
        normed, residual = self.post_attention_layernorm(branch, residual)
        return self.mlp(normed), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class PanGuPiModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: PanGuPiDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class PanGuPiForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    # HF checkpoints keep q/k/v and gate/up apart; vLLM stacks each group into one GEMM.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )
    # LoRA adapters name the HF modules; vLLM applies them to the stacked layers that hold them.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    embedding_modules = {"embed_tokens": "input_embeddings", "lm_head": "output_embeddings"}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = PanGuPiModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied lm_head aliases embed_tokens; the loader sees the alias and loads the table once.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
