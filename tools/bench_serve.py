"""Serving benchmark: vLLM serving PanGu-π against HF `generate()` on the same checkpoint and against
vLLM serving a LLaMA of the same shape, at several concurrencies, in one run.

For each system and concurrency c, c clients each send requests back to back (closed loop) until
c × --requests-per-client are done; every request has the same prompt length and generates exactly
--max-tokens tokens. Measured: output tokens/s (median of --rounds turns, the systems taking turns),
time to first token (TTFT) and inter-token latency (ITL) percentiles. vLLM is measured over HTTP
with streaming, as a client sees it; HF `generate()` runs in-process with static batches of c (its
best case: no HTTP, no tokenizer round trip).

    python tools/bench_serve.py                      # tiny checkpoints built on the fly
    python tools/bench_serve.py --model DIR          # an existing PanGu-π checkpoint
    python tools/bench_serve.py --preset pangu-pi-1b --one-at-a-time --skip hf direct \
        --concurrency 1 8 --prompt-tokens 32 --max-tokens 32      # the 1B shape, one engine in memory at a time

`pangu-pi serve` puts a gateway in front of its engines; the same engine is also measured directly
on its loopback port ("pangu-pi-direct", with the internal key read from the engine process), which
gives the gateway's cost as `gateway_vs_direct_tokens_per_s_cN` (1.0 = free).

A decode step reads every weight once, so at the lowest concurrency the checkpoint's bytes times
decode steps per second (`weight_bytes_per_s`) is put beside the machine's read bandwidth, measured
by tools/bench_membw.py before any engine starts (`memory_bandwidth_bytes_per_s`, all threads).

The last line printed is JSON, with `vs_hf_tokens_per_s_c8`, `vs_llama_tokens_per_s_c8`,
`gateway_vs_direct_tokens_per_s_c8`, `weight_bytes_per_s` and `memory_bandwidth_bytes_per_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

LAUNCH = "import sys; from pangu_pi.cli import main; sys.exit(main(sys.argv[1:]))"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="PanGu-π checkpoint (default: build one of --preset)")
    p.add_argument("--preset", default="tiny",
                   help="shape of the built checkpoint, e.g. pangu-pi-1b (the vocabulary is "
                   "that of a tokenizer trained on the embedded corpus)")
    p.add_argument("--workdir", type=Path, help="scratch folder for checkpoints and caches (default: a temp dir)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="requests per client at each level (min 4 in all)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vllm-arg", action="append", default=None,
                   help="extra argument for the vLLM engines (repeatable; default: --enforce-eager)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="turns per system at each concurrency (median reported)")
    p.add_argument("--skip", nargs="*", default=[], choices=["hf", "llama", "direct"], help="systems to leave out")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="keep one model in memory at a time: each turn starts its system, runs every concurrency "
                   "and stops it (for models whose engines do not fit side by side, e.g. 1B in fp32); "
                   "turns still alternate, round after round")  # fmt: skip
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring the memory bandwidth")
    return p.parse_args()


# --------------------------------------------------------------------------------------- workloads


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` tokens, cut from the default corpus."""
    from pangu_pi.corpus import default_corpus_files

    ids: list[int] = []
    for path in default_corpus_files(limit_bytes=400_000):
        ids += tokenizer(path.read_text(errors="replace")).input_ids
        if len(ids) >= count * length:
            break
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def combine(name: str, c: int, rounds: list[dict]) -> dict:
    """One row per system and concurrency: the median round's throughput, latencies pooled over rounds."""
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    ttft = [x for r in rounds for x in r["ttft"]]
    itl = [x for r in rounds for x in r["itl"]]
    rates = [r["tokens"] / r["wall"] for r in rounds]
    return {
        "system": name,
        "concurrency": c,
        "tokens_per_s": float(np.median(rates)),
        "tokens_per_s_rounds": [round(x, 1) for x in rates],
        "load_average_rounds": [r.get("load") for r in rounds],  # 1-minute load average as each turn began
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "output_tokens": sum(r["tokens"] for r in rounds),
        # Per request: decode steps a second after its first token (at c=1, the engine's step rate).
        "decode_steps_per_s": (sum(r["decode_steps"] for r in rounds) / max(1e-9, sum(r["decode_s"] for r in rounds))
                               if all("decode_s" in r for r in rounds) else float("nan")),
    }


# ---------------------------------------------------------------------------------------- vLLM side


class Server:
    def __init__(self, model: Path, name: str, args: argparse.Namespace, env: dict, log: Path):
        from pangu_pi.net import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log = log
        vllm_args = args.vllm_arg if args.vllm_arg is not None else ["--enforce-eager"]
        cmd = [sys.executable, "-c", LAUNCH, "serve", str(model), "--name", name, "--port", str(self.port),
               "--dtype", args.dtype, "--max-model-len", str(args.prompt_tokens + args.max_tokens + 8),
               "--", "--max-num-seqs", str(max(args.concurrency)), *vllm_args]  # fmt: skip
        self.process = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.headers: dict[str, str] = {}

    def wait(self, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} server not ready after {timeout} s")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of the gateway (this server's own process) and of its engines (the rest)."""
        import psutil

        def used(p) -> float:
            t = p.cpu_times()
            return t.user + t.system

        me = psutil.Process(self.process.pid)
        engines = 0.0
        for child in me.children(recursive=True):
            try:
                engines += used(child)
            except psutil.Error:
                pass
        return used(me), engines

    def direct(self) -> "Direct":
        """The engine behind this server's gateway, at its own port with its internal key."""
        import psutil

        from pangu_pi.serving.engines import VLLM_SERVER_MODULE
        from pangu_pi.serving.request_guard import API_KEY_ENV

        for child in psutil.Process(self.process.pid).children():
            cmd = child.cmdline()
            if VLLM_SERVER_MODULE in cmd:
                # The engines listen on Unix sockets in the server's private folder (same user here).
                uds = cmd[cmd.index("--uds") + 1]
                key = child.environ()[API_KEY_ENV]
                return Direct("http://engine", self.name, {"Authorization": f"Bearer {key}"}, uds)
        raise SystemExit(f"no engine process under {self.name}'s server")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # The engines are the gateway's children in its session: wait until they are gone too, so the
        # next system's engine never shares the memory with this one's.
        deadline = time.monotonic() + 60
        while True:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.5)


class Direct:
    def __init__(self, url: str, name: str, headers: dict[str, str], uds: str | None = None):
        self.url, self.name, self.headers, self.uds = url, name, headers, uds


async def _stream_one(client, url: str, name: str, prompt: list[int], max_tokens: int, headers=None):
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices"):
                stamps.append(time.perf_counter())  # one event per decoding step of this request
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return start, stamps, tokens


async def run_vllm_round(server: Server, prompts: list[list[int]], c: int, total: int, max_tokens: int) -> dict:
    import httpx

    queue = list(range(total))
    ttft, itl, tokens, steps = [], [], 0, [0, 0.0]

    async def client_loop(client):
        nonlocal tokens
        while queue:
            i = queue.pop()
            start, stamps, n = await _stream_one(client, server.url, server.name, prompts[i % len(prompts)], max_tokens,
                                                 server.headers)  # fmt: skip
            if n != max_tokens:
                raise SystemExit(f"{server.name}: a request produced {n} tokens, expected {max_tokens}")
            tokens += n
            ttft.append(stamps[0] - start)
            itl.extend(np.diff(stamps).tolist())
            # Decode steps after the first token, by the clock of the first and last events: a stream
            # may carry several tokens in one event, which the ITL percentiles cannot see.
            steps[0] += n - 1
            steps[1] += stamps[-1] - stamps[0]

    limits = httpx.Limits(max_connections=c + 4)
    uds = getattr(server, "uds", None)  # an engine measured directly, on its socket
    transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits) if uds else None
    async with httpx.AsyncClient(timeout=None, limits=limits, transport=transport) as client:
        await _stream_one(client, server.url, server.name, prompts[0], 8, server.headers)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
        wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall": wall, "ttft": ttft, "itl": itl, "decode_steps": steps[0], "decode_s": steps[1]}


# ------------------------------------------------------------------------------------------ HF side


class _StepClock:
    """A generate() streamer that only records when each decoding step's tokens arrive."""

    def __init__(self):
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call hands over the prompt
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf_round(model, prompts: list[list[int]], c: int, total: int, max_tokens: int) -> dict:
    import torch

    ttft, itl, tokens = [], [], 0
    order = list(range(total))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, total, c):
            batch = torch.tensor([prompts[i % len(prompts)] for i in order[first : first + c]])
            clock = _StepClock()
            start = time.perf_counter()
            out = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=clock,
            )
            generated = out.shape[1] - batch.shape[1]
            tokens += generated * batch.shape[0]
            for _ in range(batch.shape[0]):  # static batch: every request sees the same step times
                ttft.append(clock.stamps[0] - start)
                itl.extend(np.diff(clock.stamps).tolist())
    return {"tokens": tokens, "wall": time.perf_counter() - t0, "ttft": ttft, "itl": itl}


# --------------------------------------------------------------------------------------------- main


def start_systems(specs, args: argparse.Namespace, workdir: Path, prompts) -> tuple[list, dict]:
    """Bring up the named systems; returns the vLLM servers (PanGu-π's first) and every target by name."""
    systems: dict[str, object] = {}
    servers = []
    try:
        for name, path in specs:
            if name != "hf-generate":
                print(f"starting vLLM for {name} ({path})", flush=True)
                servers.append(Server(path, name, args, dict(os.environ), workdir / f"{name}.log"))
        for server in servers:
            server.wait()
            systems[server.name] = server
            if server.name == "pangu-pi" and "direct" not in args.skip:
                systems["pangu-pi-direct"] = server.direct()
        if any(name == "hf-generate" for name, _ in specs):
            import torch

            from pangu_pi import PanGuPiForCausalLM

            path = dict(specs)["hf-generate"]
            model = PanGuPiForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
            run_hf_round(model, prompts, 1, 1, 8)  # warm-up
            systems["hf-generate"] = model
    except BaseException:
        stop_systems(servers, systems)
        raise
    return servers, systems


def stop_systems(servers: list, systems: dict) -> None:
    for server in servers:
        server.stop()
    systems.clear()  # drops the in-process HF model, if any


def measure_turn(name: str, target, servers: list, prompts, c: int, total: int, args: argparse.Namespace) -> dict:
    """One round of one system at concurrency c."""
    load = float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")
    sample = _measure_turn(name, target, servers, prompts, c, total, args)
    sample["load"] = load
    return sample


def _measure_turn(name: str, target, servers: list, prompts, c: int, total: int, args: argparse.Namespace) -> dict:
    if name == "hf-generate":
        return run_hf_round(target, prompts, c, total, args.max_tokens)
    # The gateway's CPU is read from PanGu-π's server (the first), whichever system's turn it is.
    gateway = servers[0] if servers and servers[0].name == "pangu-pi" else None
    before = gateway.cpu_seconds() if gateway else (0.0, 0.0)
    sample = asyncio.run(run_vllm_round(target, prompts, c, total, args.max_tokens))
    after = gateway.cpu_seconds() if gateway else (0.0, 0.0)
    sample["gateway_cpu_s"], sample["engine_cpu_s"] = (a - b for a, b in zip(after, before))
    return sample


def _weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors (safetensors files; their JSON headers are a few kB)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))



def main() -> int:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    workdir.mkdir(parents=True, exist_ok=True)
    for var, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                     ("HF_HOME", "hf"), ("TRITON_CACHE_DIR", "triton"), ("TORCH_EXTENSIONS_DIR", "ext")):  # fmt: skip
        os.environ.setdefault(var, str(workdir / sub))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from pangu_pi.tokenizer import load_tokenizer, train_tokenizer
    from tiny_models import build_llama_like, build_pangu  # tools/, beside this script

    pangu_dir = args.model
    if pangu_dir is None:
        pangu_dir = workdir / f"pangu-{args.preset}"
        if not (pangu_dir / "config.json").exists():
            build_pangu(pangu_dir, train_tokenizer(None, workdir / "tokenizer", progress=False), preset=args.preset)
    llama_dir = workdir / f"llama-same-shape-{pangu_dir.name}"
    if "llama" not in args.skip and not (llama_dir / "config.json").exists():
        build_llama_like(pangu_dir, llama_dir)

    tokenizer = load_tokenizer(pangu_dir)
    totals = {c: max(4, c * args.requests_per_client) for c in args.concurrency}
    prompts = make_prompts(tokenizer, max(totals.values()), args.prompt_tokens)

    bandwidth = None
    if not args.no_bandwidth:
        # Before any engine is up, so the measurement sees the machine's memory, not the engines' traffic.
        from bench_membw import measure

        bandwidth = measure(gib=1.0, repeats=5)
    specs = [("pangu-pi", pangu_dir)] + ([] if "llama" in args.skip else [("llama", llama_dir)])
    specs += [] if "hf" in args.skip else [("hf-generate", pangu_dir)]
    samples: dict[tuple[str, int], list[dict]] = {}
    if args.one_at_a_time:
        # One model in memory at a time: each turn brings its system up, runs every level and takes it
        # down again; turns alternate (the first rotates) so a change of load falls on both systems.
        for r in tqdm(range(args.rounds), desc="benchmark rounds", unit="round"):
            for name, path in specs[r % len(specs) :] + specs[: r % len(specs)]:
                servers, systems = start_systems([(name, path)], args, workdir, prompts)
                try:
                    for c in args.concurrency:
                        for target_name, target in systems.items():
                            sample = measure_turn(target_name, target, servers, prompts, c, totals[c], args)
                            samples.setdefault((target_name, c), []).append(sample)
                finally:
                    stop_systems(servers, systems)
    else:
        # All systems stay up and take turns, round after round: on a machine whose load changes (other
        # jobs, thermal limits), measuring one system after the other would compare the load, not them.
        # An idle vLLM server costs ~1% of a core, so keeping the other one up does not disturb a turn.
        servers, systems = start_systems(specs, args, workdir, prompts)
        try:
            levels = [(c, r) for c in args.concurrency for r in range(args.rounds)]
            for c, r in tqdm(levels, desc="benchmark rounds", unit="round"):
                names = list(systems)
                names = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
                for name in names:
                    sample = measure_turn(name, systems[name], servers, prompts, c, totals[c], args)
                    samples.setdefault((name, c), []).append(sample)
        finally:
            stop_systems(servers, systems)
    results = []
    for (name, c), rounds in samples.items():
        results.append(combine(name, c, rounds))
        if name == "pangu-pi":
            # What the gateway costs, whatever else the machine runs: its share of the CPU that
            # serving took (on a machine the engine keeps busy, throughput loses about as much).
            gateway, engine = sum(r["gateway_cpu_s"] for r in rounds), sum(r["engine_cpu_s"] for r in rounds)
            results[-1]["gateway_cpu_share"] = gateway / max(1e-9, gateway + engine)
            results[-1]["gateway_cpu_us_per_token"] = gateway / sum(r["tokens"] for r in rounds) * 1e6
    if ("pangu-pi-direct", args.concurrency[0]) in samples:
        for c in args.concurrency:
            # Rounds of the two run back to back: their ratio, round by round, is less exposed to
            # the machine's load changing than the ratio of the two medians.
            pairs = zip(samples[("pangu-pi", c)], samples[("pangu-pi-direct", c)])
            paired = [(g["tokens"] / g["wall"]) / (d["tokens"] / d["wall"]) for g, d in pairs]
            results.append({"system": "gateway-vs-direct", "concurrency": c,
                            "paired_ratio_median": float(np.median(paired)),
                            "paired_ratios": [round(x, 3) for x in paired]})  # fmt: skip
    args.weight_bytes = {"pangu-pi": _weight_bytes(pangu_dir), "llama": _weight_bytes(llama_dir)}
    args.bandwidth = bandwidth
    order = {"pangu-pi": 0, "pangu-pi-direct": 1, "llama": 2, "hf-generate": 3, "gateway-vs-direct": 4}
    results.sort(key=lambda r: (order[r["system"]], r["concurrency"]))
    return report(results, args)


def _row(r: dict) -> str:
    return (f"{r['system']:>12} c={r['concurrency']:<3} {r['tokens_per_s']:9.1f} tok/s  "
            f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms p99 {r['ttft_p99_ms']:8.1f} ms  "
            f"ITL p50 {r['itl_p50_ms']:7.1f} ms p99 {r['itl_p99_ms']:7.1f} ms")  # fmt: skip


def report(results: list[dict], args: argparse.Namespace) -> int:
    by = {(r["system"], r["concurrency"]): r for r in results}
    print("\nsystem        conc   tok/s   TTFT p50/p99 (ms)   ITL p50/p99 (ms)")
    for r in results:
        if "tokens_per_s" in r:
            print(_row(r))
    ratios = {}
    print("\nratios of vLLM PanGu-π output tokens/s:")
    for c in args.concurrency:
        pangu = by.get(("pangu-pi", c))
        for other, key in (("hf-generate", "vs_hf"), ("llama", "vs_llama"), ("pangu-pi-direct", "gateway_vs_direct")):
            if pangu and (o := by.get((other, c))):
                ratio = pangu["tokens_per_s"] / o["tokens_per_s"]
                ratios[f"{key}_tokens_per_s_c{c}"] = ratio
                print(f"  c={c:<3} vs {other:<12} {ratio:6.2f}x")
    for c in args.concurrency:
        if (pangu := by.get(("pangu-pi", c))) and "gateway_cpu_share" in pangu:
            ratios[f"gateway_cpu_share_c{c}"] = pangu["gateway_cpu_share"]
            print(f"  c={c:<3} gateway CPU: {pangu['gateway_cpu_us_per_token']:.0f} us per token, "
                  f"{100 * pangu['gateway_cpu_share']:.1f}% of the CPU serving took")  # fmt: skip
        if paired := by.get(("gateway-vs-direct", c)):
            ratios[f"gateway_vs_direct_paired_c{c}"] = paired["paired_ratio_median"]
            print(f"  c={c:<3} gateway vs direct, round by round: median {paired['paired_ratio_median']:.2f}x")
    # A decode step reads every weight once: the checkpoint's bytes times decode steps per second (one
    # request, so one step per inter-token interval) against the machine's memory bandwidth.
    c1 = min(args.concurrency)
    for system, prefix in (("pangu-pi", ""), ("llama", "llama_")):
        if (row := by.get((system, c1))) and args.weight_bytes.get(system):
            rate = args.weight_bytes[system] * row["decode_steps_per_s"]
            ratios[f"{prefix}weight_bytes"] = args.weight_bytes[system]
            ratios[f"{prefix}decode_steps_per_s_c{c1}"] = row["decode_steps_per_s"]
            ratios[f"{prefix}weight_bytes_per_s"] = rate
            print(f"  {system}: {args.weight_bytes[system] / 1e9:.2f} GB of weights, {row['decode_steps_per_s']:.2f} "
                  f"decode steps/s at c={c1}: {rate / 1e9:.1f} GB/s of weights")  # fmt: skip
    if args.bandwidth:
        ratios["memory_bandwidth_bytes_per_s"] = args.bandwidth["read_bytes_per_s_all"]
        ratios["memory_bandwidth_1t_bytes_per_s"] = args.bandwidth["read_bytes_per_s_1t"]
        ratios["memory_bandwidth"] = args.bandwidth
        print(f"  memory bandwidth (read): {args.bandwidth['read_bytes_per_s_1t'] / 1e9:.1f} GB/s one thread, "
              f"{args.bandwidth['read_bytes_per_s_all'] / 1e9:.1f} GB/s all threads")  # fmt: skip
        if "weight_bytes_per_s" in ratios:
            share = ratios["weight_bytes_per_s"] / ratios["memory_bandwidth_bytes_per_s"]
            ratios["weight_bytes_per_s_vs_bandwidth"] = share
    print(json.dumps({**ratios, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
