"""What GRPO's reference costs (`finetune.mode: grpo`): step time and memory with no reference (β 0),
a frozen copy of the starting model (full weights, β > 0) and the adapters switched off (LoRA, β > 0).

    python tools/bench_grpo.py [--steps 6] [--work DIR]

The tiny preset with random weights and a tokenizer trained on the embedded corpus; every completion
runs to max_completion_length (a random model rarely stops), so each run samples the same number of
tokens. One process, fp32, CPU or the one GPU. Prints a table and, last, one JSON line:
{"step_s": {...}, "reference_bytes": {...}, "full_ref_step_ratio": ..., "lora_ref_step_ratio": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _base(work: Path) -> Path:
    import torch

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import load_tokenizer, train_tokenizer

    base = work / "base"
    if (base / "config.json").is_file():
        return base
    tok = train_tokenizer(default_corpus_files(limit_bytes=2_000_000), work / "tok", vocab_size=2048, progress=False)
    tokenizer = load_tokenizer(tok)
    torch.manual_seed(0)
    model = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference"))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    prompts = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": a + b}
               for a in range(8) for b in range(8)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return base


def run(work: Path, name: str, steps: int, beta: float, lora: bool) -> dict:
    from pangu_pi.training.finetune import finetune

    config = {
        "model": {"init_from": str(work / "base")},
        "out": str(work / name),
        "data": {"datasets": [str(work / "prompts.jsonl")], "seq_len": 96},
        "batch": {"global_batch_size": 4, "micro_batch_size": 4},
        "optim": {"lr": 1e-4},
        "schedule": {"warmup_steps": 0, "kind": "constant"},
        "train": {"max_steps": steps},
        "checkpoint": {"save_every": 10_000},
        "finetune": {"mode": "grpo", "grpo": {"num_generations": 8, "max_completion_length": 48, "beta": beta,
                                              "rewards": [{"function": "numeric_answer"}], "lora": lora}},
        "log": {"tensorboard": False, "plot": False},
    }
    t = time.perf_counter()
    summary = finetune(config, progress=False, force=True)
    total = time.perf_counter() - t
    from pangu_pi.training.metrics import read_metrics

    rows = [r for r in read_metrics(work / name / "metrics.jsonl") if "loss" in r]
    g = summary["grpo"]
    return {"total_s": total, "completion_length": sum(r["completion_length"] for r in rows) / len(rows),
            "reference_bytes": g["reference_bytes"], "reference": g["reference"], **g["seconds_rank0"],
            "step_s": (g["seconds_rank0"]["generation"] + g["seconds_rank0"]["rewards"]
                       + g["seconds_rank0"]["reference"]) / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--work", help="folder for the model and runs (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        _base(work)
        results = {name: run(work, name, args.steps, beta, lora)
                   for name, beta, lora in (("none", 0.0, False), ("full_copy", 0.04, False),
                                            ("lora_off", 0.04, True))}
    print(f"{'reference':<10} {'run s':>7} {'gen s':>7} {'ref s':>7} {'ref MiB':>8}  completion tokens")
    for name, r in results.items():
        print(f"{name:<10} {r['total_s']:7.1f} {r['generation']:7.1f} {r['reference']:7.2f} "
              f"{r['reference_bytes'] / 2**20:8.2f}  {r['completion_length']:.1f}")
    base = results["none"]["total_s"]
    print(json.dumps({"run_s": {k: round(v["total_s"], 2) for k, v in results.items()},
                      "reference_forward_s": {k: round(v["reference"], 3) for k, v in results.items()},
                      "reference_bytes": {k: v["reference_bytes"] for k, v in results.items()},
                      "full_ref_run_ratio": round(results["full_copy"]["total_s"] / base, 3),
                      "lora_ref_run_ratio": round(results["lora_off"]["total_s"] / base, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
