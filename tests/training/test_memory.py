"""Parameter counts from the config and the per-GPU memory estimate used in docs/training.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.training.config import load_config
from pangu_pi.training.memory import GIB, count_parameters, estimate_memory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"siaf_param_shape": "scalar", "siaf_learn_weight": True, "siaf_terms": 3},
        {"tie_word_embeddings": True, "shortcut_count": 2},
        {"num_key_value_heads": 4, "shortcut_count": 0},
    ],
)
def test_count_matches_the_model(overrides):
    config = PanGuPiConfig.from_preset("tiny", vocab_size=700, siaf_backend="reference", **overrides)
    model = PanGuPiForCausalLM(config)
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())


def test_presets_have_the_paper_sizes():
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-7b"))["total"] / 1e9 == pytest.approx(6.73, abs=0.01)
    assert count_parameters(PanGuPiConfig.from_preset("pangu-pi-1b"))["total"] / 1e9 == pytest.approx(1.03, abs=0.01)


def test_zero_stages_partition_more_and_checkpointing_saves_activations():
    config = load_config(CONFIGS / "pangu-pi-7b.yaml")
    by_stage = {}
    for stage in (1, 2, 3):
        config.train.zero_stage = stage
        by_stage[stage] = estimate_memory(config, 64)
    assert by_stage[1].gradients > by_stage[2].gradients == by_stage[3].gradients
    assert by_stage[2].weights > by_stage[3].weights
    assert by_stage[1].optimizer == by_stage[2].optimizer == pytest.approx(12 * by_stage[1].parameters / 64)
    config.train.zero_stage = 2
    with_ckpt = estimate_memory(config, 64).activations
    config.train.activation_checkpointing = False
    assert estimate_memory(config, 64).activations > 5 * with_ckpt


def test_the_7b_recipe_fits_an_80gb_gpu_on_64():
    est = estimate_memory(load_config(CONFIGS / "pangu-pi-7b.yaml"), 64)
    assert 15 * GIB < est.total < 70 * GIB
    assert "total" in est.table()


def _cpu_1b(layers: int = 12, **zero) -> object:
    """The 2-process ZeRO-3 fp32 run of benchmarks/RESULTS.md ("Real sizes"), at `layers` depth."""
    sets = [f"model.num_hidden_layers={layers}", "data.datasets=[]", "data.tokenizer=null", "data.seq_len=256",
            "batch.global_batch_size=2", "batch.micro_batch_size=1", "train.precision=fp32", "train.zero_stage=3"]
    sets += [f"deepspeed.zero_optimization.{key}={value}" for key, value in zero.items()]
    return load_config(CONFIGS / "pangu-pi-1b.yaml", sets, check_paths=False)


SMALL_BUCKETS = {"stage3_max_live_parameters": 1e8, "stage3_max_reuse_distance": 1e8,
                 "stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": 5e7, "sub_group_size": 5e7}


def test_buckets_are_capped_by_the_parameter_count():
    # A 2.8 M-parameter model never fills DeepSpeed's 5e8-element default bucket: only what it
    # fills becomes resident, so the bucket terms follow the model, not the configured size.
    tiny = load_config(CONFIGS / "tiny.yaml", ["data.datasets=[]", "data.tokenizer=null", "train.precision=fp32",
                                               "train.zero_stage=3"], check_paths=False)
    est = estimate_memory(tiny, 2, vocab_size=8192, device="cpu")
    assert est.buffers == 2 * 4 * est.parameters  # the bucket and the reduce-scatter's copy of it
    assert est.gathered == 4 * est.parameters
    config = _cpu_1b(**SMALL_BUCKETS)
    big = estimate_memory(config, 2, vocab_size=8192, device="cpu")
    assert big.parameters > 5e7
    assert big.buffers == 2 * 4 * 5e7
    assert big.gathered == 4 * (1e8 + 5e7)  # live parameters plus one prefetch bucket


def test_stage3_terms_follow_deepspeeds_layout():
    config = _cpu_1b(**SMALL_BUCKETS)
    est = estimate_memory(config, 2, vocab_size=8192, device="cpu")
    P = est.parameters
    assert est.weights == pytest.approx(4 * P / 2)  # the fp32 partition the model computes with
    assert est.gradients == pytest.approx(4 * P / 2)  # the flat gradient-partition buffer
    assert est.optimizer == pytest.approx(12 * P / 2)  # fp32 master (a tensor of its own), m, v
    # the optimizer steps on a fresh flat copy of one sub-group's gradient at a time
    assert est.gradient_copy == pytest.approx(4 * 5e7)
    config.deepspeed["zero_optimization"]["sub_group_size"] = 1e9
    assert estimate_memory(config, 2, vocab_size=8192, device="cpu").gradient_copy == pytest.approx(4 * P / 2)


def test_unfused_adamw_adds_two_group_sized_temporaries():
    config = _cpu_1b(**SMALL_BUCKETS)
    fused = estimate_memory(config, 2, vocab_size=8192, device="cpu")
    assert fused.optimizer_temporaries == 0  # the trainer's torch AdamW is fused, on CPU as on GPU
    config.deepspeed["optimizer"] = {"params": {"fused": False}}
    unfused = estimate_memory(config, 2, vocab_size=8192, device="cpu")
    assert unfused.optimizer_temporaries == pytest.approx(8 * 5e7)
    assert unfused.total - fused.total == pytest.approx(8 * 5e7)


def test_cpu_runs_carry_the_process_baseline_and_gpu_runs_do_not():
    config = _cpu_1b(layers=1)
    cpu, gpu = estimate_memory(config, 2, vocab_size=8192, device="cpu"), estimate_memory(config, 2, vocab_size=8192)
    assert 0.3 * GIB < cpu.baseline < 0.8 * GIB
    assert gpu.baseline == 0
    assert "process baseline" in cpu.table() and "process baseline" not in gpu.table()


@pytest.mark.parametrize(("layers", "measured_gib"), [(3, 3.30), (12, 8.03)])
def test_estimate_matches_the_measured_peaks(layers, measured_gib):
    # Peak resident memory per process measured on 2-process CPU runs (benchmarks/RESULTS.md, "Real
    # sizes"): full width 2048, FFN 5632, 3 layers through the trainer's build / initialize / step
    # path, all 12 (653.6 M parameters) with tools/bench_pretrain_1b.py.
    est = estimate_memory(_cpu_1b(layers, **SMALL_BUCKETS), 2, vocab_size=8192, device="cpu")
    assert est.total / GIB == pytest.approx(measured_gib, rel=0.15)


def test_estimate_matches_the_measured_tiny_run():
    # tools/bench_pretrain_1b.py --config configs/tiny.yaml: 0.61 GiB a process, almost all of it
    # the interpreter with torch and DeepSpeed; the estimate once added 2 GiB of unfilled buckets.
    tiny = load_config(CONFIGS / "tiny.yaml", ["data.datasets=[]", "data.tokenizer=null", "data.seq_len=256",
                                               "batch.global_batch_size=2", "batch.micro_batch_size=1",
                                               "train.precision=fp32", "train.zero_stage=3"], check_paths=False)
    est = estimate_memory(tiny, 2, vocab_size=8192, device="cpu")
    assert est.total / GIB == pytest.approx(0.61, rel=0.15)
