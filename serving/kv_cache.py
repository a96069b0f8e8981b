"""How much KV cache each CPU engine worker gets (vLLM's VLLM_CPU_KVCACHE_SPACE): enough for the
models and what fits in the free memory of the NUMA node and the cgroup. Without it, vLLM's CPU
backend reserves 92% of the memory node and, with anything else running, refuses to start."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from .config import ServeConfig
from .engines import KV_CACHE_ENV, Engine

GiB = 1 << 30
PROCESS_OVERHEAD = GiB // 2  # memory of one vLLM process (API server, engine core, worker) besides weights and cache


def node_memory() -> tuple[int, int]:
    """(total, available) bytes as vLLM's CPU worker counts them: NUMA node 0's free and
    reclaimable memory, clamped to the cgroup's limit; the whole machine's where there are no nodes."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        info = {}
        for line in Path("/sys/devices/system/node/node0/meminfo").read_text().splitlines():
            parts = line.split()
            info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        total = info["MemTotal"]
        available = info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"]
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(limit_file).read_text().strip())
            if limit < total:
                total = limit
                available = max(0, min(available, limit - int(Path(usage_file).read_text().strip())))
            break
    return total, available


def _weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(model_dir).glob(pattern))


def _kv_bytes(model_dir: Path, config: ServeConfig) -> int:
    """KV cache bytes a full context takes for one sequence of this model."""
    model = json.loads((Path(model_dir) / "config.json").read_text())
    layers = int(model.get("num_hidden_layers", 1))
    heads = int(model.get("num_attention_heads", 1))
    kv_heads = int(model.get("num_key_value_heads") or heads)
    head_dim = int(model.get("head_dim") or int(model.get("hidden_size", 64)) // heads)
    dtype = (
        config.dtype if config.dtype != "auto" else str(model.get("dtype") or model.get("torch_dtype") or "bfloat16")
    )
    width = 4 if "32" in dtype else 2
    length = config.max_model_len or int(model.get("max_position_embeddings", 2048))
    return 2 * layers * kv_heads * head_dim * width * length


def choose_kv_cache(engines: list[Engine], config: ServeConfig, device: str) -> tuple[int | None, str]:
    """GiB of KV cache per CPU worker that fit the free memory and the models, and a line saying so;
    None where the user chose (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes, --gpu-memory-utilization)
    or on a GPU, where vLLM sizes the cache itself."""
    if device != "cpu" or os.environ.get(KV_CACHE_ENV, "").strip():
        return None, ""
    if any(config.passthrough(f) is not None for f in ("--kv-cache-memory-bytes", "--gpu-memory-utilization")):
        return None, ""
    tp = config.tensor_parallel_size
    _, available = node_memory()
    weights = sum(_weights_bytes(e.model_dir) for e in engines)
    spare = available - weights - len(engines) * (2 + tp) * PROCESS_OVERHEAD
    workers = len(engines) * tp
    # Half of what is left, so the machine keeps room for everything else that runs on it.
    fits = int(spare / 2 // (workers * GiB))
    seqs = int(config.passthrough("--max-num-seqs") or 256)
    need = max(math.ceil(_kv_bytes(e.model_dir, config) * seqs / tp / GiB) for e in engines)
    gib = max(1, min(need, fits))
    line = (f"KV cache {gib} GiB per engine worker ({KV_CACHE_ENV}={gib}; {available / GiB:.1f} GiB free, "
            f"weights {weights / GiB:.2f} GiB, {workers} worker(s)); set {KV_CACHE_ENV} to choose")  # fmt: skip
    if spare < workers * GiB:
        line += "; warning: memory is short, the engines may not start"
    return gib, line
