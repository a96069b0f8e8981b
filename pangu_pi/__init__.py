"""PanGu-π: a LLaMA-style decoder with series informed activation and augmented shortcuts.

Importing the package registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved PanGu-π checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import PRESETS, ConfigError, PanGuPiConfig
from .modeling import PanGuPiForCausalLM, PanGuPiModel, PanGuPiPreTrainedModel

AutoConfig.register(PanGuPiConfig.model_type, PanGuPiConfig, exist_ok=True)
AutoModel.register(PanGuPiConfig, PanGuPiModel, exist_ok=True)
AutoModelForCausalLM.register(PanGuPiConfig, PanGuPiForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "ConfigError",
    "PanGuPiConfig",
    "PanGuPiForCausalLM",
    "PanGuPiModel",
    "PanGuPiPreTrainedModel",
]
