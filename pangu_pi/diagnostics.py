"""Feature-collapse diagnostics: how diverse the token features stay, layer by layer.

The paper's §3 argues that with depth the token features H (tokens × d) of a transformer approach
the subspace M = {1·xᵀ : x ∈ R^d} where every token has the same feature, and that more nonlinearity
(SIAF, the augmented shortcut) slows that collapse. Two measures make the claim checkable on any
checkpoint, PanGu-π or a transformers LLaMA:

* feature diversity, the paper's distance d_M(H) = min_x ||H − 1xᵀ||_F. The minimum is at x = the
  mean token feature, so d_M(H) = ||H − 1·meanᵀ||_F. We divide it by ||H||_F: the residual stream's
  scale grows with depth in a pre-norm model, and a raw distance would mostly measure that growth.
  The ratio lies in [0, 1]: 0 when every token has the same feature, and
  diversity² = 1 − n·||mean||² / ||H||², the share of the features' energy that is not shared.
* effective rank (Roy & Vetterli, 2007): exp of the Shannon entropy of the singular values
  normalised to sum 1. Identical rows give 1; n orthonormal rows give n. We report it for H and for
  the centred H (the mean removed), whose effective rank is 0 when all tokens coincide.

Each measure is computed per sequence and averaged over the sample's sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .folders import is_checkpoint

MEASURES = {
    "diversity": "d_M(H) / ||H||_F with d_M(H) = min_x ||H - 1 x^T||_F = ||H - 1 mean(H)^T||_F (0 = all tokens equal)",
    "distance_per_token": "d_M(H) / sqrt(n): the root-mean-square distance of a token's feature to the mean feature",
    "effective_rank": "exp(entropy(s / sum(s))) over the singular values s of H (Roy & Vetterli)",
    "effective_rank_centered": "the effective rank of H - 1 mean(H)^T (0 when all tokens are equal)",
}
PLOTTED = ("diversity", "effective_rank", "effective_rank_centered")


# --- the measures --------------------------------------------------------------------------------


def effective_rank(singular_values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Roy & Vetterli's effective rank from singular values (last dim); batched; 0 for a zero matrix.

    Singular values below the matrix-rank tolerance (scale · k · eps, scale = σ_max by default) are
    rounding noise of an exactly lower-rank matrix and would otherwise add entropy, so they count as
    zero. A centred matrix passes the uncentred one's σ_max as `scale`: removing a mean that is not
    exactly representable leaves noise of that size, which must not read as spread.
    """
    s = singular_values.to(torch.float64).clamp_min(0)
    k = s.shape[-1]
    scale = s.amax(dim=-1) if scale is None else scale.to(torch.float64)
    tol = scale.unsqueeze(-1) * 4 * k * torch.finfo(torch.float64).eps
    s = torch.where(s > tol, s, torch.zeros_like(s))
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))


def feature_measures(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """All measures of token-feature matrices `h` of shape (tokens, d) or (batch, tokens, d).

    Returns one value (or one per batch entry) per name in MEASURES, computed in float64.
    """
    if h.dim() not in (2, 3) or h.shape[-2] < 1:
        raise ValueError(f"expected features of shape (tokens, d) or (batch, tokens, d), got {tuple(h.shape)}")
    h = h.to(torch.float64)
    n = h.shape[-2]
    centered = h - h.mean(dim=-2, keepdim=True)
    distance = torch.linalg.matrix_norm(centered)  # Frobenius over the last two dims
    norm = torch.linalg.matrix_norm(h)
    sv = torch.linalg.svdvals(h)
    tiny = torch.finfo(torch.float64).tiny
    diversity = torch.where(norm > 0, distance / norm.clamp_min(tiny), torch.zeros_like(norm))
    return {
        "diversity": diversity,
        "distance_per_token": distance / math.sqrt(n),
        "effective_rank": effective_rank(sv),
        "effective_rank_centered": effective_rank(torch.linalg.svdvals(centered), scale=sv.amax(dim=-1)),
    }


# --- one model over one text sample --------------------------------------------------------------


@dataclass
class LayerStats:
    """Running sums of each measure over sequences, for a mean and a standard deviation."""

    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    squares: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            v = v.reshape(-1)
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
            self.squares[name] = self.squares.get(name, 0.0) + float((v * v).sum())
        self.count += int(next(iter(values.values())).numel())

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in MEASURES:
            mean = self.sums[name] / self.count
            out[name] = mean
            out[name + "_std"] = math.sqrt(max(self.squares[name] / self.count - mean * mean, 0.0))
        return out


def token_windows(tokenizer, documents: Iterable[str], max_tokens: int, seq_len: int) -> torch.Tensor:
    """Up to `max_tokens` tokens of the documents, packed into (windows, seq_len).

    Documents are joined with the end-of-sequence token (where the tokenizer has one) and read only
    as far as needed, so a large corpus costs no more than the sample. Text shorter than one window
    gives a single shorter window.
    """
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < seq_len:
        if len(ids) < 2:
            raise UserError("the input text gives fewer than 2 tokens; pass a longer --input")
        return torch.tensor([ids], dtype=torch.long)
    whole = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:whole], dtype=torch.long).view(-1, seq_len)


def layer_names(num_hidden_states: int) -> list[str]:
    # transformers' convention, which PanGu-π follows: entry 0 is the embeddings, entry i the output
    # of block i, and the last entry has gone through the final norm (what the LM head sees).
    last = num_hidden_states - 1
    return ["embeddings"] + [f"layer {i}" for i in range(1, last)] + [f"layer {last} (final norm)"]


@torch.inference_mode()
def analyze_model(
    model,
    windows: torch.Tensor,
    batch_size: int = 4,
    skip_first: int = 0,
    progress: bool = True,
    desc: str = "analyze",
) -> list[dict]:
    """Per hidden state (embeddings, then each block): the measures averaged over `windows`.

    `skip_first` leaves out each window's first positions, which in trained causal models often act
    as an attention sink with an outsized norm that would dominate ||H||.
    """
    if windows.shape[1] - skip_first < 2:
        raise UserError(f"--skip-first {skip_first} leaves fewer than 2 tokens per sequence; lower it")
    model.eval()
    # The decoder alone: its hidden states are all we need, and it skips the vocabulary-wide logits.
    body = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    stats: list[LayerStats] | None = None
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        out = body(input_ids=batch, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        if stats is None:
            stats = [LayerStats() for _ in hidden]
        for layer, h in zip(stats, hidden):
            layer.add(feature_measures(h[:, skip_first:, :].float().cpu()))
    names = layer_names(len(stats))
    return [{"index": i, "name": names[i], **s.summary()} for i, s in enumerate(stats)]


# --- loading checkpoints -------------------------------------------------------------------------


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(path)!r} is not a folder; pass an HF checkpoint folder (with config.json)")
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"no config.json in {path}; pass an HF checkpoint folder (`pangu-pi export` writes one)"
        )
    return path


def load_checkpoint(
    path: str | Path, tokenizer_path: str | Path | None, dtype: torch.dtype, device: str, seq_len: int | None = None
):
    """Model and tokenizer of an HF checkpoint folder, PanGu-π or any transformers causal LM.

    The cheap checks (config, context length, tokenizer) come before the weights are read.
    """
    import pangu_pi  # noqa: F401  (registers PanGu-π with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = check_checkpoint_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read {path / 'config.json'}: {_first_line(err)}") from err
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len and limit and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds {path}'s context of {limit}; lower --seq-len")
    tok_dir = Path(tokenizer_path) if tokenizer_path else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load a tokenizer from {tok_dir} ({type(err).__name__}); "
            "save one beside the model or pass --tokenizer DIR"
        ) from err
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load {path} as a causal language model: {_first_line(err)}") from err
    return model.to(device), tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe(model) -> dict:
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "parameters": model.num_parameters(),
    }


# --- the picture ---------------------------------------------------------------------------------


def plot(results: dict, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {
        "diversity": "feature diversity  d_M(H) / ||H||_F",
        "effective_rank": "effective rank of H",
        "effective_rank_centered": "effective rank of centred H",
    }
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4), constrained_layout=True)
    for ax, measure in zip(axes, PLOTTED):
        for entry in results["models"]:
            layers = entry["layers"]
            x = [layer["index"] for layer in layers]
            ax.plot(x, [layer[measure] for layer in layers], marker="o", markersize=3, label=entry["label"])
        ax.set_title(titles[measure])
        ax.set_xlabel("depth (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    sample = results["sample"]
    fig.suptitle(
        f"token-feature collapse by depth ({sample['sequences_per_model']} × {sample['seq_len']} tokens per model)"
    )
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# --- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pangu-pi analyze",
        description="Per-layer feature diversity (the paper's d_M(H), normalised) and effective rank of the "
        "token features of one or more HF checkpoints over a text sample; writes JSON and a PNG.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="HF checkpoint folders (PanGu-π or LLaMA)")
    p.add_argument(
        "--input", nargs="+", metavar="PATH", help="text files, folders or globs (default: the embedded corpus)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for diagnostics.json and diagnostics.png")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="tokens of text per model (default 4096)")
    p.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per sequence (default 256)")
    p.add_argument("--label", nargs="+", metavar="NAME", help="one curve label per model (default: folder names)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for every model (default: each model's own)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N")
    p.add_argument("--skip-first", type=int, default=0, metavar="K", help="leave out each sequence's first K tokens")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def labels_for(models: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(models):
            raise UserError(f"got {len(labels)} --label values for {len(models)} models; give one label per model")
        if len(set(labels)) != len(labels):
            raise UserError("--label values repeat; give each model its own label")
        return list(labels)
    names = [Path(m).resolve().name or str(m) for m in models]
    # Two checkpoints named the same (run1/final, run2/final) still need distinct curves.
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_args(args) -> None:
    for flag, value, least in (
        ("--max-tokens", args.max_tokens, 2),
        ("--seq-len", args.seq_len, 2),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < least:
            raise UserError(f"{flag} {value} is too small; use at least {least}")
    if args.skip_first < 0:
        raise UserError(f"--skip-first {args.skip_first} is negative; use 0 or more")
    if args.skip_first > args.seq_len - 2:
        raise UserError(f"--skip-first {args.skip_first} leaves fewer than 2 of --seq-len {args.seq_len} tokens")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    return device


def run(args) -> dict:
    from .corpus import default_corpus_files, expand_inputs, read_documents

    check_args(args)
    labels = labels_for(args.models, args.label)
    files = expand_inputs(args.input) if args.input else default_corpus_files()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    results: dict = {
        "measures": MEASURES,
        "sample": {
            "input": [str(p) for p in args.input] if args.input else "embedded default corpus (Python stdlib sources)",
            "max_tokens": args.max_tokens,
            "seq_len": args.seq_len,
            "skip_first": args.skip_first,
            "sequences_per_model": 0,
        },
        "models": [],
    }
    for model_path in args.models:  # fail on a wrong path before spending minutes on the models before it
        check_checkpoint_dir(model_path)
    show = not args.no_progress
    if not show:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for model_path, label in zip(args.models, labels):
        model, tokenizer = load_checkpoint(model_path, args.tokenizer, dtype, device, args.seq_len)
        windows = token_windows(tokenizer, read_documents(files), args.max_tokens, args.seq_len)
        layers = analyze_model(model, windows, args.batch_size, args.skip_first, show, desc=label)
        results["models"].append(
            {
                "label": label,
                "path": str(model_path),
                **describe(model),
                "sequences": int(windows.shape[0]),
                "tokens_per_sequence": int(windows.shape[1]) - args.skip_first,
                "layers": layers,
            }
        )
        results["sample"]["sequences_per_model"] = max(results["sample"]["sequences_per_model"], int(windows.shape[0]))
        del model
    return results


def report(results: dict) -> str:
    lines = []
    for entry in results["models"]:
        first, last = entry["layers"][0], entry["layers"][-1]
        lines.append(
            f"{entry['label']}: diversity {first['diversity']:.3f} → {last['diversity']:.3f}, "
            f"effective rank {first['effective_rank']:.1f} → {last['effective_rank']:.1f} "
            f"(embeddings → last of {entry['num_hidden_layers']} layers)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "diagnostics.json"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    png_path = plot(results, out / "diagnostics.png")
    print(report(results))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
