"""Benchmark the SIAF-gated product: forward+backward time and peak memory of each backend.

    python tools/bench_kernels.py                       # 4096 tokens × 5632 FFN width, fp32, n = 2
    python tools/bench_kernels.py --param-shape scalar --weight --repeats 20

On CPU it times `compiled` against `reference`; on CUDA (when available) it also times `triton`
against `reference` and against a device-to-device copy of the same number of bytes, and reports the
achieved GB/s. The last line of stdout is one JSON object: `compiled_speedup` (reference time /
compiled time) and `compiled_memory_ratio` (compiled peak / reference peak), plus `triton_*` keys on
CUDA.

Time: every repeat runs each backend once, in turn (interleaved, so a burst of load from other
processes hits all of them alike), forward then `backward` of a fixed upstream gradient with the
leaves' `.grad` cleared first, so each step allocates its gradients as a training step does. The
figure is the median over repeats; the minimum is printed too. Compilation happens in warm-up
repeats that are not timed.

Peak memory on CPU: PyTorch's CPU allocator keeps no statistics, and Python's tracemalloc does not see
its allocations. Tensors of this size are served by mmap and unmapped when freed (they are far above
glibc's mmap threshold), so the process's resident set follows the live tensor bytes. Before each
measured step the script resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs),
notes the current RSS, runs forward+backward, and reads the new peak (VmHWM): the difference is the
step's peak memory above what already existed (inputs, parameters, upstream gradient), i.e. the
activations kept for backward, temporaries, the output and the new gradients. Linux only; elsewhere
the peak is reported as unavailable. As a cross-check, the bytes each backend saves for backward
(beyond its inputs) are counted through torch.autograd.graph.saved_tensors_hooks.

On CUDA, peak memory is torch.cuda.max_memory_allocated above the allocation before the step, and
times come from CUDA events.

Figures (`run_figures`, unless --no-figures), for the backend a device runs fused (triton on CUDA,
compiled on CPU; `siaf_backend` names it):
- `siaf_fwd_bw_fraction`, `siaf_fwd_bwd_bw_fraction`: bytes at the minimal traffic (forward reads
  gate, up and writes out: 3 tensors; forward+backward adds dout, gate, up read and dgate, dup
  written: 8) per second, as a fraction of a same-device copy of a large tensor (read + write). The
  worst over --figure-shapes; per shape in `siaf_figures`. On CPU these are CPU figures
  (`figures_device`), nothing about a GPU.
- `siaf_vs_compile_fwd_bwd` (and `_fwd`): torch.compile of the plain reference's time / the backend's.
- `siaf_call_cpu_us_decode` / `_prefill`: host time of one call (inference, no gradient) of the
  backend `auto` picks at a decode shape (1 token) and a prefill shape (--prefill-tokens); every
  backend's in `siaf_call_cpu_us`. On CUDA that is launch cost (no synchronisation inside the timed
  calls); on CPU it includes the arithmetic.
- `kernel_errors`: ‖x − ref‖ / ‖ref‖ against float64, for the output and the five gradients (learned
  c, per-channel parameters in the activations' dtype), per dtype and shape (--error-shapes).

    python tools/bench_kernels.py --quick                 # CPU smoke test: small shapes, every JSON key
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_pi.kernels import siaf_and_mul  # noqa: E402
from pangu_pi.kernels.reference import siaf_and_mul_reference, spread_init  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--width", type=int, default=5632, help="FFN width (intermediate_size)")
    p.add_argument("--terms", type=int, default=2, help="n, the number of SIAF terms")
    p.add_argument("--activation", default="silu")
    p.add_argument("--param-shape", choices=("channel", "scalar"), default="channel")
    p.add_argument("--weight", action="store_true", help="learned c_i (default: c = 1, weight=None)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA section even where CUDA is available")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU section (compiled vs reference)")
    p.add_argument(
        "--triton-on-cpu",
        action="store_true",
        help="without CUDA, run the Triton section on CPU under TRITON_INTERPRET=1 (a smoke test, small shapes)",
    )
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 gives steady CPU figures on a shared machine: an OpenMP region "
                        "with a descheduled thread waits for a whole time slice)")
    p.add_argument("--no-figures", action="store_true", help="skip the bandwidth, call-cost and error figures")
    p.add_argument("--figure-shapes", default="8192x5632,4096x11008,16384x11008",
                   help="TOKENSxWIDTH,... for the bandwidth fractions and the ratio to torch.compile")
    p.add_argument("--error-shapes", default="333x1001,4096x5632", help="TOKENSxWIDTH,... for kernel_errors")
    p.add_argument("--error-dtypes", default="bfloat16,float32")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="the prefill shape of the call-cost figure")
    p.add_argument(
        "--bare-compile",
        action="store_true",
        help="also time torch.compile(reference) on CPU, for comparison (another compilation, ~1 min)",
    )
    args = p.parse_args(argv)
    if args.quick:  # small defaults; shapes given explicitly are kept
        args.tokens, args.width, args.repeats, args.warmup = min(args.tokens, 256), min(args.width, 352), 3, 1
        for name, small in (("figure_shapes", "256x352"), ("error_shapes", "64x352,1024x352"), ("prefill_tokens", 256)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, small)
    return args


def make_inputs(args, device):
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    n, width = args.terms, args.width
    a, b, c = spread_init(n)
    shape = (n, width) if args.param_shape == "channel" else (n,)

    def param(values):
        col = torch.tensor(values, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1)))
        return col.expand(shape).contiguous().to(device).requires_grad_()

    gate = (2 * torch.randn(args.tokens, width, generator=gen)).to(device, dtype).requires_grad_()
    up = torch.randn(args.tokens, width, generator=gen).to(device, dtype).requires_grad_()
    dout = torch.randn(args.tokens, width, generator=gen).to(device, dtype)
    weight = param(c) if args.weight else None
    return [gate, up, param(a), param(b), weight], dout


def clear_grads(inputs) -> None:
    # Before the baseline is taken: otherwise the previous step's gradients are freed inside the
    # measured step and the new ones fill their place unseen.
    for t in inputs:
        if t is not None:
            t.grad = None


_bare_compiled = None


def call(backend, inputs, activation):
    """`siaf_and_mul` with this backend; "bare-compile" is the reference wrapped in torch.compile."""
    global _bare_compiled
    if backend == "bare-compile":
        if _bare_compiled is None:
            _bare_compiled = torch.compile(siaf_and_mul_reference)
        return _bare_compiled(*inputs, activation)
    return siaf_and_mul(*inputs, activation=activation, backend=backend)


def step(backend, inputs, dout, activation):
    out = call(backend, inputs, activation)
    out.backward(dout)
    return out


# ---------------------------------------------------------------------------------------------- CPU


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status()
        return True
    except OSError:
        return False


def cpu_peak_bytes(backend, inputs, dout, activation) -> int:
    clear_grads(inputs)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status()["VmRSS"]
    out = step(backend, inputs, dout, activation)
    peak = _proc_status()["VmHWM"]
    del out
    return peak - before


def saved_bytes(backend, inputs, activation) -> int:
    """Bytes of distinct storages saved for backward, not counting the inputs themselves."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(backend, inputs, activation)
    del out
    return sum(seen.values())


def time_interleaved(backends, inputs, dout, args, timer):
    for _ in range(args.warmup):
        for b in backends:
            clear_grads(inputs)
            step(b, inputs, dout, args.activation)
    times = {b: [] for b in backends}
    for _ in range(args.repeats):
        for b in backends:
            # Freeing the last step's gradients and output is not part of the op: both happen outside
            # the timed region.
            clear_grads(inputs)
            seconds, out = timer(lambda b=b: step(b, inputs, dout, args.activation))
            times[b].append(seconds)
            del out
    return times


def cpu_timer(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# --------------------------------------------------------------------------------------------- CUDA


def cuda_timer(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, result


def cuda_peak_bytes(backend, inputs, dout, activation) -> int:
    clear_grads(inputs)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step(backend, inputs, dout, activation)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


def copy_seconds(nbytes: int, repeats: int, device: torch.device, timer) -> float:
    """Median time of a same-device copy that reads nbytes/2 and writes nbytes/2."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return statistics.median(timer(lambda: dst.copy_(src))[0] for _ in range(repeats))


def run_device(args, result, device: torch.device):
    """Triton against the reference and a plain copy of the same bytes, on `device`.

    On CUDA this is the real measurement. On CPU (`--triton-on-cpu`, Triton's interpreter) it only
    exercises this code path with small shapes: interpreter times say nothing about a GPU.
    """
    cuda = device.type == "cuda"
    timer = cuda_timer if cuda else cpu_timer
    inputs, dout = make_inputs(args, device)
    backends = ["reference", "triton"]
    times = time_interleaved(backends, inputs, dout, args, timer)
    med = {b: statistics.median(t) for b, t in times.items()}
    peak_fn = cuda_peak_bytes if cuda else (cpu_peak_bytes if _can_reset_peak_rss() else None)
    peaks = {b: peak_fn(b, inputs, dout, args.activation) if peak_fn else 0 for b in backends}
    elem = inputs[0].element_size()
    # Fused forward reads gate, up and writes out; fused backward reads dout, gate, up and writes
    # dgate, dup: 8 tensors of tokens × width, the minimum any implementation moves.
    nbytes = 8 * args.tokens * args.width * elem
    copy_s = copy_seconds(nbytes, args.repeats, device, timer)
    name = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"\n{device.type.upper()} ({name}), {args.dtype}")
    for b in backends:
        print(
            f"  {b:<12} fwd+bwd median {med[b] * 1e3:8.3f} ms  min {min(times[b]) * 1e3:8.3f} ms  "
            f"peak {peaks[b] / 2**20:8.1f} MiB  {nbytes / med[b] / 1e9:7.1f} GB/s"
        )
    print(f"  copy of the same {nbytes / 2**20:.0f} MiB: {copy_s * 1e3:.3f} ms, {nbytes / copy_s / 1e9:.1f} GB/s")
    print(
        f"  triton vs reference: {med['reference'] / med['triton']:.2f}× faster, "
        f"{_ratio(peaks, 'triton', 'reference') or 0:.2f}× the peak; {copy_s / med['triton']:.2f}× copy speed"
    )
    result.update(
        triton_speedup=med["reference"] / med["triton"],
        triton_memory_ratio=_ratio(peaks, "triton", "reference"),
        triton_gbps=nbytes / med["triton"] / 1e9,
        copy_gbps=nbytes / copy_s / 1e9,
        triton_fraction_of_copy=copy_s / med["triton"],
        triton_ms=med["triton"] * 1e3,
        reference_device_ms=med["reference"] * 1e3,  # CUDA, or CPU under --triton-on-cpu
        gpu=name,
    )


def _ratio(values, num, den):
    """values[num] / values[den], or None where not measured (or too small to register)."""
    if not values or not values[den]:
        return None
    return values[num] / values[den]


def run_cpu(args, result):
    """`compiled` against `reference` on CPU: time, peak memory, bytes saved for backward."""
    inputs, dout = make_inputs(args, torch.device("cpu"))
    backends = ["reference", "compiled"] + (["bare-compile"] if args.bare_compile else [])
    times = time_interleaved(backends, inputs, dout, args, cpu_timer)
    med = {b: statistics.median(t) for b, t in times.items()}
    if _can_reset_peak_rss():
        peaks = {b: min(cpu_peak_bytes(b, inputs, dout, args.activation) for _ in range(3)) for b in backends}
    else:
        peaks = None
    saved = {b: saved_bytes(b, inputs, args.activation) for b in backends}
    tensor_mib = inputs[0].numel() * inputs[0].element_size() / 2**20
    print(f"\nCPU (one {args.tokens}×{args.width} tensor = {tensor_mib:.0f} MiB)")
    for b in backends:
        peak = f"peak {peaks[b] / 2**20:8.1f} MiB" if peaks else "peak n/a"
        print(
            f"  {b:<12} fwd+bwd median {med[b] * 1e3:8.1f} ms  min {min(times[b]) * 1e3:8.1f} ms  {peak}  "
            f"saved for backward {saved[b] / 2**20:7.1f} MiB"
        )
    result.update(
        compiled_speedup=med["reference"] / med["compiled"],
        compiled_memory_ratio=_ratio(peaks, "compiled", "reference"),
        compiled_speedup_min=min(times["reference"]) / min(times["compiled"]),
        compiled_ms=med["compiled"] * 1e3,
        reference_ms=med["reference"] * 1e3,
        compiled_saved_ratio=_ratio(saved, "compiled", "reference"),
    )
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}×"  # noqa: E731
    print(
        f"  compiled vs reference: {result['compiled_speedup']:.2f}× faster (median; "
        f"{result['compiled_speedup_min']:.2f}× on minima), {fmt(result['compiled_memory_ratio'])} the peak "
        f"memory, {fmt(result['compiled_saved_ratio'])} the bytes saved for backward"
    )
    if args.bare_compile:
        result["bare_compile_speedup"] = med["reference"] / med["bare-compile"]
        result["bare_compile_memory_ratio"] = _ratio(peaks, "bare-compile", "reference")
        print(f"  torch.compile(reference) vs reference: {result['bare_compile_speedup']:.2f}× faster")



# ------------------------------------------------------------------------------------------- figures


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]


def _timer_for(device):
    return cuda_timer if device.type == "cuda" else cpu_timer


def _median_time(fn, repeats, warmup, device) -> float:
    timer = _timer_for(device)
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn)[0] for _ in range(repeats))


def large_copy_gbps(device, repeats: int) -> float:
    """A same-device copy of a large tensor (1 GiB on CUDA, 256 MiB on CPU), counted read + write."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    return nbytes / copy_seconds(nbytes, repeats, device, _timer_for(device)) / 1e9


def figure_inputs(tokens, width, dtype, device, seed=0):
    args = argparse.Namespace(tokens=tokens, width=width, terms=2, param_shape="channel", weight=True,
                              dtype=str(dtype).removeprefix("torch."))
    return make_inputs(args, device)


def bandwidth_figures(args, device, backend, copy_gbps) -> dict:
    dtype = getattr(torch, args.dtype)
    figures = {}
    for tokens, width in _shapes(args.figure_shapes):
        inputs, dout = figure_inputs(tokens, width, dtype, device)
        elem = inputs[0].element_size()
        times = {}
        for b in (backend, "bare-compile"):

            def fwd(b=b, inputs=inputs):
                return call(b, inputs, args.activation)

            def fwd_bwd(b=b, inputs=inputs, dout=dout):
                clear_grads(inputs)
                return step(b, inputs, dout, args.activation)

            with torch.no_grad():
                times[b, "fwd"] = _median_time(fwd, args.repeats, args.warmup + 1, device)
            times[b, "fwd_bwd"] = _median_time(fwd_bwd, args.repeats, args.warmup + 1, device)
        fwd_gbps = 3 * tokens * width * elem / times[backend, "fwd"] / 1e9
        fb_gbps = 8 * tokens * width * elem / times[backend, "fwd_bwd"] / 1e9
        figures[f"{tokens}x{width}"] = dict(
            fwd_ms=times[backend, "fwd"] * 1e3, fwd_bwd_ms=times[backend, "fwd_bwd"] * 1e3,
            compile_fwd_ms=times["bare-compile", "fwd"] * 1e3,
            compile_fwd_bwd_ms=times["bare-compile", "fwd_bwd"] * 1e3,
            fwd_bw_fraction=fwd_gbps / copy_gbps, fwd_bwd_bw_fraction=fb_gbps / copy_gbps,
            vs_compile_fwd=times["bare-compile", "fwd"] / times[backend, "fwd"],
            vs_compile_fwd_bwd=times["bare-compile", "fwd_bwd"] / times[backend, "fwd_bwd"],
        )  # fmt: skip
        f = figures[f"{tokens}x{width}"]
        print(f"  {tokens}x{width} {args.dtype} {backend}: fwd {f['fwd_ms']:.3f} ms "
              f"({f['fwd_bw_fraction']:.0%} of copy), "
              f"fwd+bwd {f['fwd_bwd_ms']:.3f} ms ({f['fwd_bwd_bw_fraction']:.0%}); torch.compile(reference) "
              f"{f['compile_fwd_bwd_ms']:.3f} ms: {f['vs_compile_fwd_bwd']:.2f}x")
    return figures


def call_cpu_us(args, device, backends) -> dict:
    """Median host µs of one inference call per backend, at 1 token and at --prefill-tokens."""
    from pangu_pi.kernels import resolve_backend

    dtype = getattr(torch, args.dtype)
    out = {}
    for regime, tokens in (("decode", 1), ("prefill", args.prefill_tokens)):
        inputs, _ = figure_inputs(tokens, args.width, dtype, device)
        inputs = [t.detach() for t in inputs]
        for b in backends + ["auto"]:
            with torch.inference_mode():
                for _ in range(args.warmup + 2):
                    call(b, inputs, args.activation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times = []
                for _ in range(max(args.repeats, 20) if regime == "decode" else args.repeats):
                    t0 = time.perf_counter()
                    call(b, inputs, args.activation)
                    times.append(time.perf_counter() - t0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            out.setdefault(b, {})[regime] = statistics.median(times) * 1e6
        chosen = resolve_backend("auto", device, dtype, tokens, args.width, False)
        out.setdefault("auto_picks", {})[regime] = chosen
    return out


def error_figures(args, device, backend) -> dict:
    """‖x − ref‖ / ‖ref‖ against float64 for the output and the five gradients."""
    errors = {}
    for dtype_name in args.error_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for tokens, width in _shapes(args.error_shapes):
            inputs, dout = figure_inputs(tokens, width, dtype, device)
            # Parameters in the activations' dtype, as a model held in that dtype has them.
            inputs = [t.detach().to(dtype).requires_grad_() for t in inputs]
            out = call(backend, inputs, args.activation)
            out.backward(dout)
            ref = [t.detach().double().requires_grad_() for t in inputs]
            ref_out = siaf_and_mul_reference(*ref, args.activation)
            ref_out.backward(dout.double())
            names = ["out", "gate", "up", "scale", "shift", "weight"]
            pairs = [(out, ref_out)] + [(t.grad, r.grad) for t, r in zip(inputs, ref)]
            e = {k: ((x.double() - r).norm() / r.norm()).item() for k, (x, r) in zip(names, pairs)}
            e["worst"] = max(e.values())
            errors[f"{dtype_name}_{tokens}x{width}"] = e
            print(f"  errors {dtype_name} {tokens}x{width} ({backend} vs float64): worst {e['worst']:.2e} "
                  + " ".join(f"{k} {v:.1e}" for k, v in e.items() if k != "worst"))
            del inputs, ref, out, ref_out
    return errors


def run_figures(args, result, device):
    """Errors first, then call costs, then bandwidth (the part that compiles most): after each, a JSON
    line marked "partial", so a run cut short by a time limit keeps what it measured."""
    cuda = device.type == "cuda"
    backend = "triton" if cuda else "compiled"
    print(f"\nFigures on {device.type} ({'GPU' if cuda else 'CPU figures, nothing about a GPU'}), backend {backend}")
    result.update(siaf_backend=backend, figures_device="cuda" if cuda else "cpu")
    result["kernel_errors"] = error_figures(args, device, backend)
    print(json.dumps({**result, "partial": True}), flush=True)
    calls = call_cpu_us(args, device, ["reference", "compiled"] + (["triton"] if cuda else []))
    for b, v in calls.items():
        if b != "auto_picks":
            print(f"  host µs per call, {b:<9}: decode {v['decode']:8.1f}  "
                  f"prefill ({args.prefill_tokens}) {v['prefill']:8.1f}")
    print(f"  auto picks {calls['auto_picks']}")
    result.update(siaf_call_cpu_us_decode=calls["auto"]["decode"], siaf_call_cpu_us_prefill=calls["auto"]["prefill"],
                  siaf_call_cpu_us=calls)
    print(json.dumps({**result, "partial": True}), flush=True)
    copy_gbps = large_copy_gbps(device, args.repeats)
    print(f"  copy of a large tensor: {copy_gbps:.1f} GB/s (read + write)")
    figures = bandwidth_figures(args, device, backend, copy_gbps)
    worst = lambda key: min(f[key] for f in figures.values())  # noqa: E731
    result.update(
        copy_gbps_large=copy_gbps,
        siaf_fwd_bw_fraction=worst("fwd_bw_fraction"),
        siaf_fwd_bwd_bw_fraction=worst("fwd_bwd_bw_fraction"),
        siaf_vs_compile_fwd=worst("vs_compile_fwd"),
        siaf_vs_compile_fwd_bwd=worst("vs_compile_fwd_bwd"),
        siaf_figures=figures,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args) -> dict:
    print(
        f"SIAF fwd+bwd: {args.tokens} tokens × {args.width} width, {args.dtype}, n = {args.terms}, "
        f"{args.activation}, {args.param_shape} parameters, weight {'learned' if args.weight else 'None'}; "
        f"{args.repeats} repeats after {args.warmup} warm-up"
    )
    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result: dict = {}
    if not args.gpu_only:
        run_cpu(args, result)
    if torch.cuda.is_available() and not args.cpu_only:
        run_device(args, result, torch.device("cuda"))
    elif args.triton_on_cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--triton-on-cpu needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
        run_device(args, result, torch.device("cpu"))
    if not args.no_figures:
        if torch.cuda.is_available() and not args.cpu_only:
            run_figures(args, result, torch.device("cuda"))
        else:
            run_figures(args, result, torch.device("cpu"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
