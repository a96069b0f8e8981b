"""tools/bench_kernels.py and tools/bench_decode.py run end to end on CPU at small shapes and end with
the JSON keys the GPU check reads. Their figures here are CPU figures (the fused backend on CPU is
the compiled one; graphed decode is inductor without CUDA graphs): the test pins the keys and that
each is a measured, positive number, not the GPU's values.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_kernels_quick_reports_every_figure(capsys):
    # Width 37 and per-channel n = 2 silu with a learned c: small compilations.
    result = load("bench_kernels").main(
        ["--quick", "--cpu-only", "--gpu-only", "--figure-shapes", "64x37", "--error-shapes", "16x37,256x37",
         "--error-dtypes", "float32,bfloat16", "--prefill-tokens", "256", "--threads", "1"]
    )  # fmt: skip
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert last["figures_device"] == "cpu" and last["siaf_backend"] == "compiled"
    for key in ("siaf_fwd_bw_fraction", "siaf_fwd_bwd_bw_fraction", "siaf_vs_compile_fwd_bwd",
                "siaf_call_cpu_us_decode", "siaf_call_cpu_us_prefill", "copy_gbps_large"):  # fmt: skip
        assert last[key] > 0, key
    assert last["siaf_call_cpu_us"]["auto_picks"] == {"decode": "reference", "prefill": "compiled"}
    assert set(last["kernel_errors"]) == {"float32_16x37", "float32_256x37", "bfloat16_16x37", "bfloat16_256x37"}
    assert last["kernel_errors"]["float32_256x37"]["worst"] < 1e-5
    assert last["kernel_errors"]["bfloat16_256x37"]["worst"] < 1e-2
    assert set(last["kernel_errors"]["bfloat16_16x37"]) == {"out", "gate", "up", "scale", "shift", "weight", "worst"}


@pytest.mark.slow
def test_bench_decode_quick_reports_eager_and_graphed(capsys):
    result = load("bench_decode").main(["--quick"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and "partial" not in last
    for key in ("pangu_vs_llama_decode_eager", "pangu_vs_llama_decode_graphed", "decode_bw_fraction",
                "pangu_graphed_ms_per_token", "llama_graphed_ms_per_token"):  # fmt: skip
        assert last[key] > 0, key
    assert last["bw_reference"].startswith("measured cpu copy")
    assert last["pangu_vs_llama_decode_eager"] == last["pangu_vs_llama_decode"]
