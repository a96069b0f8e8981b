"""Checks a LoRA adapter folder against the model an engine serves, before the engine tries to load it.

vLLM answers an adapter it cannot load with a 500 and a traceback's last line; a folder that is not
an adapter, a rank over the engine's `--max-lora-rank` or an adapter trained for another model's
shape deserve a 400 that says which. The shapes come from the safetensors headers alone (a few KB
read from each file), so checking costs nothing even for a large model.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for --max-lora-rank
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# LoRA on an embedding: A is (rank, vocabulary), B is (width, rank); the weight is (vocabulary, width).
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<part>[AB])(?:\.[^.]+)?$")


class AdapterProblem(ValueError):
    """An adapter that cannot be served by this engine; the message says why and what to do."""


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound on a header


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a safetensors file's header; AdapterProblem when it is not one."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise AdapterProblem(f"{path} is not a safetensors file ({type(err).__name__}: {err})") from None


@functools.lru_cache(maxsize=16)
def model_shapes(model_dir: str) -> dict[str, list[int]]:
    """Every weight's shape in an HF checkpoint folder (one file or sharded), without loading it."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        shapes.update(safetensors_shapes(file))
    return shapes


def lora_rank(path: Path) -> int:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise AdapterProblem(f"{path} is not a peft LoRA adapter folder (it has no adapter_config.json)")
    try:
        return int(json.loads(config.read_text()).get("r", 0))
    except (ValueError, TypeError, AttributeError, OSError) as err:
        raise AdapterProblem(f"{config} is not a valid adapter config ({err})") from None


def next_vllm_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def check_adapter(path: Path, model_dir: Path | None, max_rank: int | None) -> None:
    """Raise AdapterProblem unless `path` is a LoRA adapter that fits the model in `model_dir` and
    an engine started with `--max-lora-rank max_rank` (None: the engine serves no adapters)."""
    path = Path(path)
    if not path.exists():
        raise AdapterProblem(f"lora_path {path} does not exist on the server")
    if not path.is_dir():
        raise AdapterProblem(f"lora_path {path} is a file; pass the adapter's folder (with adapter_config.json)")
    rank = lora_rank(path)
    if max_rank is None:
        raise AdapterProblem("this engine was started without adapters (--no-runtime-lora); restart without that flag")
    if rank > max_rank:
        raise AdapterProblem(
            f"the adapter's rank {rank} is over the engine's maximum of {max_rank}; restart `pangu-pi serve` "
            f"with --max-lora-rank {next_vllm_rank(rank)}"
        )
    weights = path / "adapter_model.safetensors"
    if model_dir is None or not weights.is_file():
        return  # .bin adapters: vLLM reads them itself, and says what does not fit
    base = model_shapes(str(model_dir))
    if not base:
        return
    for key, shape in safetensors_shapes(weights).items():
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise AdapterProblem(f"{weights}: `{key}` has no valid shape")
        match = _LORA_KEY.match(key)
        if match is None:
            _check_other_weight(key, shape, base)
            continue
        module = match["module"]
        target = base.get(f"{module}.weight")
        if target is None:
            raise AdapterProblem(
                f"the adapter changes `{module}`, which the served model does not have: it was trained "
                f"for another model"
            )
        # lora_A is (rank, in_features), lora_B is (out_features, rank); the weight is (out, in).
        if len(shape) != 2 or len(target) != 2:
            raise AdapterProblem(f"the adapter's `{key}` is not a matrix (shape {shape})")
        got, want = (shape[1], target[1]) if match["part"] == "A" else (shape[0], target[0])
        if len(shape) != 2 or got != want:
            side = "inputs" if match["part"] == "A" else "outputs"
            raise AdapterProblem(
                f"the adapter was trained for a model of another shape: its `{module}` has {got} {side}, "
                f"the served model's has {want}"
            )


def _check_other_weight(key: str, shape: list[int], base: dict[str, list[int]]) -> None:
    """An embedding's LoRA pair, or a whole weight the adapter replaces (peft's modules_to_save)."""
    match = _EMBEDDING_KEY.match(key)
    if match is not None:
        target = base.get(f"{match['module']}.weight")
        if target is None:
            raise AdapterProblem(f"the adapter changes `{match['module']}`, which the served model does not have")
        if len(shape) != 2 or len(target) != 2:
            raise AdapterProblem(f"the adapter's `{key}` is not a matrix (shape {shape})")
        if match["part"] == "A":
            got, want, what = shape[1], target[0], "vocabulary"
        else:
            got, want, what = shape[0], target[1], "width"
        if got != want:
            raise AdapterProblem(
                f"the adapter was trained for a model of another shape: its `{match['module']}` has a {what} of "
                f"{got}, the served model's has {want}"
            )
        return
    name = re.sub(r"^base_model\.model\.", "", key).replace(".modules_to_save.default", "")
    if name in base and list(base[name]) != list(shape):
        raise AdapterProblem(
            f"the adapter was trained for a model of another shape: its `{name}` is {shape}, "
            f"the served model's is {base[name]}"
        )
