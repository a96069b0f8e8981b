"""`pangu-pi`: one command, many subcommands, each a thin shell over a library function.

Subcommands are imported only when called, so `pangu-pi info` does not pay for DeepSpeed or vLLM.
An error a user can fix prints one line naming the problem and the fix, without a traceback.
"""

from __future__ import annotations

import importlib
import sys

# name → (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("pangu_pi.commands", "info_main", "print a preset's config and parameter count"),
    "tokenizer": ("pangu_pi.commands", "tokenizer_main",
                  "train or extend a SentencePiece BPE tokenizer; update its chat template"),
    "init": ("pangu_pi.commands", "init_main", "write a freshly initialised checkpoint for a preset"),
    "convert-llama": ("pangu_pi.conversion", "convert_main", "turn a LLaMA checkpoint into a PanGu-π one"),
    "generate": ("pangu_pi.commands", "generate_main", "sample text from a checkpoint"),
    "data": ("pangu_pi.training.data.cli", "main", "tokenize text into training shards"),
    "pretrain": ("pangu_pi.training.pretrain", "main", "pretrain with DeepSpeed"),
    "export": ("pangu_pi.training.export", "main", "write an HF checkpoint from a training checkpoint"),
    "finetune": ("pangu_pi.training.finetune", "main", "instruction-tune (full or LoRA)"),
    "resize": ("pangu_pi.vocab", "resize_main", "grow a model's vocabulary to a new tokenizer"),
    "eval": ("pangu_pi.training.evaluate", "main", "multiple-choice and perplexity evaluation"),
    "analyze": ("pangu_pi.diagnostics", "main", "feature-collapse diagnostics per layer"),
    "serve": ("pangu_pi.serving.server", "main", "OpenAI-compatible server on vLLM"),
    "chat": ("pangu_pi.serving.chat", "main", "terminal chat client for the endpoint"),
}


# Re-exported: library code raises it from pangu_pi.errors; older imports name it here.
from .errors import UserError  # noqa: E402,F401


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pangu-pi COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def quiet_accelerator_probe() -> None:
    """Tell DeepSpeed up front when there is no GPU; otherwise it warns on every import."""
    import os

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; run `pangu-pi --help` for the list"
        print(f"pangu-pi: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    quiet_accelerator_probe()
    from .config import ConfigError

    try:
        return getattr(importlib.import_module(module), func)(rest) or 0
    except (UserError, ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"pangu-pi {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
