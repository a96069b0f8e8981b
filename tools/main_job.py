"""The main job, end to end on one machine: tokenizer → shards → pretraining → export → serving.

    python tools/main_job.py [--run DIR] [--max-steps N] [--nproc N] [--port P]

Each stage is the `pangu-pi` command a user would type, run as a child process, so this module
shows the whole workflow and checks that the pieces fit. Everything it writes goes under one run
folder; a second run reuses the environment, the tokenizer and the shards, and trains afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def pangu(*args: str) -> list[str]:
    return [sys.executable, "-m", "pangu_pi.cli", *args]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def untrained_val_loss(model_dir: Path, data_dir: Path, seq_len: int, samples: int, seed: int) -> float:
    """Validation loss of a freshly initialised model of the trained one's shape, on the same split."""
    import torch
    import torch.nn.functional as F

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import tokenizer_hash

    from pangu_pi.training.data import PackedMixture

    config = PanGuPiConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = PanGuPiForCausalLM(config).eval()
    val = PackedMixture(
        [{"path": str(data_dir), "weight": 1.0}],
        seq_len=seq_len,
        eos_id=config.eos_token_id if isinstance(config.eos_token_id, int) else 2,
        vocab_size=config.vocab_size,
        tokenizer_hash=tokenizer_hash(model_dir),
        split="val",
        seed=seed,
    )
    losses = []
    with torch.no_grad():
        for i in range(min(samples, len(val))):
            sample = torch.as_tensor(val[i], dtype=torch.long)[None]
            logits = model(sample[:, :-1]).logits
            losses.append(F.cross_entropy(logits[0], sample[0, 1:]).item())
    return sum(losses) / len(losses)


class Server:
    """`pangu-pi serve` in its own process group, stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, model_dir: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        cmd = pangu("serve", str(model_dir), "--name", "pangu-pi-tiny", "--port", str(port), "--dtype", "float32")
        print("$ " + " ".join(cmd) + f"   (log: {log})", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        from pangu_pi.net import wait_until_ready

        if wait_until_ready(f"{self.url}/v1/models", timeout, process=self.proc, interval=2.0):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {self.proc.returncode}; see {self.log.name}")
        raise TimeoutError(f"the server did not answer within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def ask(url: str) -> tuple[str, str]:
    """One chat request, and one streaming completion whose pieces are printed as they arrive."""
    from pangu_pi.api_client import api_base, connect, user_errors

    client = connect(url, timeout=300)
    with user_errors(f"{api_base(url)}/chat/completions"):
        chat = client.chat.completions.create(
            model="pangu-pi-tiny",
            messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}],
            max_tokens=48,
            temperature=0.0,
        )
    answer = chat.choices[0].message.content or ""
    print(f"chat answer: {answer!r}")

    print("streaming completion: def fibonacci(n):", end="", flush=True)
    pieces = []
    with user_errors(f"{api_base(url)}/completions"):
        stream = client.completions.create(model="pangu-pi-tiny", prompt="def fibonacci(n):", max_tokens=48,
                                           temperature=0.0, stream=True)  # fmt: skip
        for chunk in stream:
            text = chunk.choices[0].text if chunk.choices else ""
            pieces.append(text)
            print(text, end="", flush=True)
    print()
    return answer, "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/main_job.py", description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "quickstart"), help="run folder (everything goes here)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--max-steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--nproc", type=int, default=2, help="local training processes")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--input", nargs="*", help="text to train on (default: the embedded default corpus)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--no-serve", action="store_true", help="stop after the export")
    args = ap.parse_args(argv)
    started = time.monotonic()
    run_dir = Path(args.run).resolve()
    train_dir, model_dir = run_dir / "train", run_dir / "model"
    tok_dir, data_dir = run_dir / "tokenizer", run_dir / "data"
    run_dir.mkdir(parents=True, exist_ok=True)

    stage("1/5 tokenizer on the embedded default corpus (the Python standard library)")
    inputs = ["--input", *args.input] if args.input else []
    # A second run with the same inputs reuses the tokenizer and shards; with other --input or
    # --vocab-size, --force lets them replace their own earlier outputs (never other files).
    run(pangu("tokenizer", "train", "--vocab-size", str(args.vocab_size), "--out", str(tok_dir), "--force", *inputs))

    stage("2/5 token shards")
    run(pangu("data", "prepare", "--tokenizer", str(tok_dir), "--out", str(data_dir), "--workers", "2", "--force",
              *inputs))

    stage(f"3/5 pretraining the tiny PanGu-π with DeepSpeed in {args.nproc} processes")
    # Every run trains from scratch; the tokenizer and shards above are what a second run reuses.
    shutil.rmtree(train_dir, ignore_errors=True)
    cmd = pangu(
        "pretrain", "--config", args.config, "--out", str(train_dir), "--nproc", str(args.nproc), "--resume", "none",
        "--set", f"data.datasets=[{{path: {data_dir}, weight: 1.0}}]", "--set", f"data.tokenizer={tok_dir}",
    )  # fmt: skip
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps), "--set", f"eval.every={max(1, args.max_steps // 2)}"]
    t0 = time.monotonic()
    run(cmd)
    train_seconds = time.monotonic() - t0

    stage("4/5 export to a transformers checkpoint")
    run(pangu("export", str(train_dir), str(model_dir), "--force"))

    steps, vals = read_metrics(train_dir)
    resolved = __import__("yaml").safe_load((train_dir / "config.yaml").read_text())
    seq_len = int(resolved["data"]["seq_len"])
    tokens_seen = int(steps[-1]["tokens"])  # cumulative in metrics.jsonl
    tokens_per_s = sum(r["tokens_per_s"] for r in steps[1:]) / max(1, len(steps) - 1)
    final_ppl = vals[-1]["val_ppl"] if vals else float("nan")
    start_ppl = math.exp(min(50.0, untrained_val_loss(model_dir, data_dir, seq_len, 32, int(resolved["seed"]))))
    params = __import__("pangu_pi").PanGuPiForCausalLM.from_pretrained(model_dir).num_parameters()

    answers = ("", "")
    if not args.no_serve:
        stage("5/5 serving the export behind the OpenAI-compatible API")
        server = Server(model_dir, args.port, run_dir / "serve.log")
        try:
            server.wait_ready()
            answers = ask(server.url)
        finally:
            server.stop()

    plot = next(iter(sorted(train_dir.rglob("loss_curves.png"))), None)
    summary = {
        "parameters": params,
        "steps": len(steps),
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_per_s, 1),
        "train_seconds": round(train_seconds, 1),
        "val_ppl_untrained": round(start_ppl, 2),
        "val_ppl_final": round(final_ppl, 2),
        "loss_curve_png": str(plot) if plot else None,
        "chat_answer": answers[0],
        "streamed_completion": answers[1],
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    stage("summary")
    print(f"loss curve: {plot}")
    print(
        f"A {params / 1e6:.1f} M-parameter PanGu-π (tiny preset: 4 layers, SIAF n=2, one augmented shortcut "
        f"per block) trained for {len(steps)} optimizer steps in {args.nproc} DeepSpeed processes on "
        f"{tokens_seen:,} tokens of the Python standard library's source, at {tokens_per_s:,.0f} tokens/s. "
        f"Validation perplexity fell from {start_ppl:,.0f} (untrained) to {final_ppl:,.2f}. "
        f"Everything is in {run_dir} (summary.json, model/, train/)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
