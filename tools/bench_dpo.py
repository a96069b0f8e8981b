"""What preference tuning costs beside SFT: peak memory per process and time per step, side by side.

    python tools/bench_dpo.py                      # a 50 M-parameter model, 1 process, 6 steps each
    python tools/bench_dpo.py --layers 4 --hidden 256 --steps 4

Three `pangu-pi finetune` runs of the same randomly initialised checkpoint on the same pairs, taking
turns: SFT on the chosen answers (full weights), DPO with full weights (reference log-probs computed
once before the first step and stored with the run) and DPO on LoRA adapters (reference = the same
model with the adapters off). While each runs, the peak resident memory (VmHWM) of its training
process is read from /proc. Beside them: what a frozen reference copy would add (the weights again,
fp32) and what the stored reference takes (32 bytes a pair). The last line is JSON:
`sft_peak_gib`, `dpo_full_peak_gib`, `dpo_lora_peak_gib`, `dpo_full_over_sft_peak`,
`dpo_full_over_sft_step_time`, `reference_bytes`, `frozen_copy_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3


def _peak_of_tree(pid: int, stop: threading.Event, out: dict) -> None:
    """The highest VmHWM of `pid` and each of its descendants (one process trains: the command itself)."""
    while not stop.is_set():
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[p] = max(out.get(p, 0), int(line.split()[1]) * 1024)
            except OSError:
                continue
        stop.wait(0.2)


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Show the sum."}],
                     "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}, the sum of the two."}],
                     "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {a + b + rng.randint(1, 50)}."}]})
    return rows


def _run(name: str, work: Path, config: dict, steps: int) -> dict:
    import yaml

    from pangu_pi.training.metrics import read_metrics

    out = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "pangu_pi.cli", "finetune", "--config", str(path), "--out", str(out),
           "--max-steps", str(steps), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    peaks: dict[int, int] = {}
    stop = threading.Event()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        watcher = threading.Thread(target=_peak_of_tree, args=(proc.pid, stop, peaks), daemon=True)
        watcher.start()
        code = proc.wait()
    stop.set()
    watcher.join()
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {work / f'{name}.log'}")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    step_s = sorted(r["forward_s"] + r["backward_s"] + r["optimizer_s"] for r in rows[1:] or rows)
    reference = out / "dpo_reference.pt"
    return {"peak_bytes": max(peaks.values()) if peaks else 0, "step_s": step_s[len(step_s) // 2],
            "reference_bytes": reference.stat().st_size if reference.is_file() else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="pairs (DPO) or chats (SFT) per step")
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)

    import torch

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import load_tokenizer, train_tokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = train_tokenizer(default_corpus_files(limit_bytes=2_000_000), work / "tokenizer", vocab_size=4096,
                              progress=False)
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model_config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=args.hidden,
                                             intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                             num_attention_heads=args.hidden // 64,
                                             num_key_value_heads=args.hidden // 64)
    model = PanGuPiForCausalLM(model_config)
    n_params = sum(t.numel() for t in model.parameters())
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    del model

    pairs = _pairs(args.pairs)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    chats = (json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in pairs)
    (work / "chats.jsonl").write_text("".join(chats))

    def config(data: str, **finetune) -> dict:
        return {"model": {"init_from": str(work / "base")}, "data": {"datasets": [str(work / data)], "seq_len": 128},
                "batch": {"global_batch_size": args.batch, "micro_batch_size": args.batch},
                "optim": {"lr": 1e-5}, "train": {"zero_stage": 2}, "checkpoint": {"save_every": 10**6},
                "log": {"tensorboard": False, "plot": False, "phase_times": True}, "finetune": finetune}

    runs = {
        "sft": config("chats.jsonl", mode="full"),
        "dpo_full": config("pairs.jsonl", mode="dpo", dpo={"lora": False}),
        "dpo_lora": config("pairs.jsonl", mode="dpo", dpo={"lora": True}, lora={"r": 16}),
    }
    results = {}
    for name, cfg in runs.items():
        t = time.perf_counter()
        results[name] = _run(name, work, cfg, args.steps)
        results[name]["wall_s"] = time.perf_counter() - t
        print(f"{name:>9}: peak {results[name]['peak_bytes'] / GIB:.2f} GiB, step {results[name]['step_s']:.2f} s "
              f"(median), run {results[name]['wall_s']:.0f} s", flush=True)

    frozen = 4 * n_params
    print(f"model: {n_params:,} parameters; a frozen fp32 reference copy would add {frozen / GIB:.2f} GiB a process; "
          f"the stored reference holds {results['dpo_full']['reference_bytes']:,} bytes for {len(pairs)} pairs")
    print(f"DPO full / SFT: peak {results['dpo_full']['peak_bytes'] / results['sft']['peak_bytes']:.3f}x, "
          f"step time {results['dpo_full']['step_s'] / results['sft']['step_s']:.2f}x "
          "(DPO's step reads 2 sequences per pair, SFT's one per chat)")
    print(json.dumps({
        "parameters": n_params,
        "sft_peak_gib": round(results["sft"]["peak_bytes"] / GIB, 3),
        "dpo_full_peak_gib": round(results["dpo_full"]["peak_bytes"] / GIB, 3),
        "dpo_lora_peak_gib": round(results["dpo_lora"]["peak_bytes"] / GIB, 3),
        "dpo_full_over_sft_peak": round(results["dpo_full"]["peak_bytes"] / results["sft"]["peak_bytes"], 3),
        "dpo_full_over_sft_step_time": round(results["dpo_full"]["step_s"] / results["sft"]["step_s"], 3),
        "reference_bytes": results["dpo_full"]["reference_bytes"],
        "frozen_copy_bytes": frozen,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
