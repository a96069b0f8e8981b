"""PanGu-π: a LLaMA-style decoder with series informed activation and augmented shortcuts.

Importing the package registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved PanGu-π checkpoint.
"""

from pathlib import Path as _Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# An install maps the repository's training/ and serving/ folders to pangu_pi.training and
# pangu_pi.serving (pyproject.toml). A checkout used without installing it (PYTHONPATH=checkout, as on
# a machine with nothing but torch) gets the same names from here.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "training" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (the package's own search path)

from .config import PRESETS, ConfigError, PanGuPiConfig  # noqa: E402 (after the search path is set)
from .modeling import PanGuPiForCausalLM, PanGuPiModel, PanGuPiPreTrainedModel  # noqa: E402

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
