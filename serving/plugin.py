"""vLLM plugin: teaches every vLLM process (API server, engine core, workers) about PanGu-π.

vLLM calls `register()` through the `vllm.general_plugins` entry point in each process it starts,
so a worker spawned on another device finds the architecture without any code of ours on its path
beyond the installed package.
"""

from __future__ import annotations

ARCHITECTURE = "PanGuPiForCausalLM"
# A "module:Class" string, not the class: vLLM imports it only when a model of this architecture is
# built, so the plugin stays cheap and never touches CUDA in a process that is about to fork.
MODEL_CLASS = "pangu_pi.serving.vllm_model:PanGuPiForCausalLM"


def register() -> None:
    # transformers must know model_type "pangu_pi" before vLLM reads a checkpoint's config.json;
    # importing the package registers it with AutoConfig.
    import pangu_pi  # noqa: F401
    from vllm import ModelRegistry

    # Idempotent: vLLM may load plugins more than once in one process.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
