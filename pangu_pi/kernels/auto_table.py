"""Which SIAF backend `auto` runs: an explicit table of (device, dtype, token count, width, graph) → backend.

The first rule that matches a call wins. "graph" is a call being traced by torch.compile or captured
into a CUDA graph: there a call's CPU cost is paid once (at capture), not per step, so only device
time counts. Outside a graph (eager) a decode step of the HF model is bound by the CPU launching
kernels, so at small token counts the backend with the cheapest call wins even if it moves more bytes.

The defaults come from what was measured (the `why` of each rule says what; GPU figures from one H200,
bf16, benchmarks/RESULTS.md and shared notes) and, where nothing was measured yet, from a stated
estimate that tools/gpu_check.sh's figures (`siaf_call_cpu_us_*`, kernel times) can confirm or move:

- CUDA, eager, up to 2047 tokens → reference. Measured at decode (7B, batch 1): 31.1 ms a token with
  the reference, 34.2 compiled, 103.9 Triton (its launch cost 223 µs of CPU per call, 116 calls a
  token). Up to ~2k tokens (estimate) a 7B layer's GPU time (≈ 0.5 ms of GEMMs at 2k tokens) stays
  below the eager loop's CPU time per layer (≈ 31.1 ms / 29 layers ≈ 1.07 ms), so the cheapest call
  still wins there.
- CUDA, eager, 2048 tokens and more → triton: device time rules; the fused kernel reads gate/up once
  where the reference makes 3n+2 passes; at 8192 × 5632 Triton and torch.compile of the reference
  measured the same (0.848 / 0.847 ms fwd+bwd) and Triton needs no per-shape compilation.
- CUDA, graph → triton: one kernel, launched by inductor's generated code or replayed by the graph.
- CPU: compiled (inductor C++) except for calls of up to ~40k elements (decode; measured on the
  2-core CPU machine, RESULTS.md 2026-12-04), where the reference is cheaper to call, and inside a
  graph, where the outer compiler fuses the reference anyway.
- A backend that cannot run (Triton missing, a dtype it does not take, compilation broken) falls back
  triton → compiled → reference.

Overrides, first match wins over the defaults:
- PANGU_PI_SIAF_BACKEND=<backend> forces one backend for every `auto` call of the process;
- PANGU_PI_SIAF_AUTO_TABLE="device,dtype,tokens,width[,graph|eager]=backend;..." puts rules in front
  of the defaults, e.g. "cuda,bfloat16,1-64,*=triton;cuda,*,*,11008=compiled" (`*` any value,
  `a-b`, `a-` and `-b` ranges of tokens or widths);
- `set_override_rules([...])` does the same from Python.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from pangu_pi.errors import UserError

ENV_TABLE = "PANGU_PI_SIAF_AUTO_TABLE"
NAMED_BACKENDS = ("reference", "compiled", "triton")
# Below this many tokens a call is "decode" in the table's printout (batched decode of up to 64
# sequences); the rules themselves use token ranges.
DECODE_MAX_TOKENS = 64
# Eager CUDA: where device time starts to outweigh a call's CPU cost (estimate, see the docstring).
CUDA_EAGER_TRITON_FROM_TOKENS = 2048
# CPU, eager: the reference's few small ops cost less than the compiled op's dispatch and guards up to
# about 40k elements (tokens × width) a call. Measured on the 2-core CPU machine, one thread, n = 2 with
# a learned c (RESULTS.md, 2026-12-04): width 352, reference/compiled µs 20/41 at 1 token, 53/72 at 64,
# 186/146 at 256; width 5632, 29/48 at 1, 60/78 at 4, 205/151 at 16. As (widths up to, tokens up to):
CPU_REFERENCE_UP_TO = ((512, 64), (2048, 16), (8192, 6), (None, 3))
ANY = "*"


@dataclass(frozen=True)
class Rule:
    backend: str
    device: str = ANY  # "cuda", "cpu", … or ANY
    dtypes: tuple[str, ...] | str = ANY  # torch dtype names ("bfloat16") or ANY
    tokens: tuple[int, int | None] = (0, None)  # inclusive range; None = unbounded
    width: tuple[int, int | None] = (0, None)
    graph: bool | None = None  # True: inside torch.compile / CUDA-graph capture; False: eager; None: both
    why: str = ""

    def matches(self, device: str, dtype: str, tokens: int, width: int, graph: bool) -> bool:
        return (
            (self.device == ANY or self.device == device)
            and (self.dtypes == ANY or dtype in self.dtypes)
            and _in(tokens, self.tokens)
            and _in(width, self.width)
            and (self.graph is None or self.graph == graph)
        )


def _in(value: int, bounds: tuple[int, int | None]) -> bool:
    low, high = bounds
    return value >= low and (high is None or value <= high)


TRITON_DTYPES = ("float32", "bfloat16", "float16")

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("triton", "cuda", TRITON_DTYPES, graph=True,
         why="in a compiled graph / CUDA graph a call costs no CPU per step; one fused pass over gate and up"),
    Rule("reference", ANY, graph=True, why="the outer compiler traces the reference and fuses it"),
    Rule("reference", "cuda", TRITON_DTYPES, tokens=(0, CUDA_EAGER_TRITON_FROM_TOKENS - 1), graph=False,
         why="eager decode is CPU-bound: 7B bf16 batch 1 measured 31.1 ms/token reference, 34.2 compiled, "
             "103.9 triton"),
    Rule("triton", "cuda", TRITON_DTYPES, graph=False,
         why="device time rules: one pass over gate/up; at 8192x5632 bf16 triton 0.848 ms = torch.compile 0.847"),
    Rule("compiled", "cuda", why="dtypes the Triton kernels do not take (float64)"),
    *(
        Rule("reference", "cpu", tokens=(0, tokens), width=(low, high), graph=False,
             why="decode-sized: a few small ops cost less to call than the compiled op (2-core CPU, measured)")
        for (low, (high, tokens)) in zip((0, 513, 2049, 8193), CPU_REFERENCE_UP_TO)
    ),
    Rule("compiled", "cpu", why="inductor's one-pass forward and backward (CPU, measured)"),
    Rule("reference", why="other devices (meta, mps, …)"),
)  # fmt: skip

_python_overrides: tuple[Rule, ...] = ()
# (environment table text, override generation, device, dtype, tokens, width, graph) → Rule. A plain
# dict: hashing the rules themselves on every call (an lru_cache keyed by the table) cost ~5 µs a call,
# a quarter of a decode-sized reference call.
_cache: dict[tuple, Rule] = {}
_generation = 0


def set_override_rules(rules) -> None:
    """Rules tried before the defaults (and after PANGU_PI_SIAF_AUTO_TABLE's); [] clears them."""
    global _python_overrides, _generation
    rules = tuple(rules)
    for r in rules:
        if r.backend not in NAMED_BACKENDS:
            raise UserError(f"SIAF auto rule names backend {r.backend!r}; use one of {', '.join(NAMED_BACKENDS)}")
    _python_overrides = rules
    _generation += 1
    _cache.clear()


def _parse_range(text: str, what: str, spec: str) -> tuple[int, int | None]:
    text = text.strip()
    if text in ("", ANY):
        return (0, None)
    try:
        if "-" in text:
            low, high = text.split("-", 1)
            return (int(low) if low else 0, int(high) if high else None)
        return (int(text), int(text))
    except ValueError:
        raise UserError(
            f"{ENV_TABLE}: {what} {text!r} in {spec!r} is not a number or range; write e.g. 1-64, 2048- or *"
        ) from None


@functools.lru_cache(maxsize=8)
def parse_table(text: str) -> tuple[Rule, ...]:
    """Rules from PANGU_PI_SIAF_AUTO_TABLE's syntax (see the module docstring)."""
    rules = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, backend = spec.partition("=")
        fields = [f.strip() for f in key.split(",")]
        if not sep or len(fields) not in (4, 5) or backend.strip() not in NAMED_BACKENDS:
            raise UserError(
                f"{ENV_TABLE}: cannot read rule {spec!r}; write device,dtype,tokens,width[,graph|eager]=backend "
                f"with backend one of {', '.join(NAMED_BACKENDS)}, e.g. cuda,bfloat16,1-64,*=triton"
            )
        device, dtype = fields[0] or ANY, fields[1] or ANY
        if dtype != ANY and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserError(f"{ENV_TABLE}: {dtype!r} in {spec!r} is not a torch dtype; write e.g. bfloat16 or *")
        graph = None
        if len(fields) == 5 and fields[4] not in (ANY, ""):
            if fields[4] not in ("graph", "eager"):
                raise UserError(f"{ENV_TABLE}: the fifth field of {spec!r} is graph, eager or *")
            graph = fields[4] == "graph"
        rules.append(Rule(
            backend.strip(), device, ANY if dtype == ANY else (dtype,),
            _parse_range(fields[2], "tokens", spec), _parse_range(fields[3], "width", spec), graph,
            why=f"{ENV_TABLE}",
        ))  # fmt: skip
    return tuple(rules)


def rules() -> tuple[Rule, ...]:
    """The table in force: environment rules, then Python overrides, then the defaults."""
    return parse_table(os.environ.get(ENV_TABLE, "")) + _python_overrides + DEFAULT_RULES


def lookup(device: str, dtype: str, tokens: int, width: int, graph: bool) -> Rule:
    """The first rule of the table in force that matches (cached per call signature)."""
    env = os.environ.get(ENV_TABLE, "")
    key = (env, _generation, device, dtype, tokens, width, graph)
    rule = _cache.get(key)
    if rule is None:
        rule = next(
            (r for r in parse_table(env) + _python_overrides + DEFAULT_RULES if r.matches(*key[2:])),
            Rule("reference", why="no rule matched"),
        )
        if len(_cache) >= 4096:  # prefill token counts vary without bound
            _cache.clear()
        _cache[key] = rule
    return rule


def regime(tokens: int, graph: bool) -> str:
    """A label for printouts: graph, decode or prefill."""
    return "graph" if graph else "decode" if tokens <= DECODE_MAX_TOKENS else "prefill"
