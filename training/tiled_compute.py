"""Tiled compute of the token-wise parts of a block (`train.tiled_mlp`): the SIAF-gated FFN and the
augmented shortcuts run through DeepSpeed's `TiledMLP` (ALST), so their wide intermediates (gate,
up, the SIAF terms, the shortcut bottleneck) exist for one tile of tokens at a time and are not kept
for backward: each module keeps only its input, and recomputes each tile in backward.

What this costs: one more forward of the FFN and the shortcuts per step (DeepSpeed's recompute). What
it saves: per token and layer, the FFN's 3·f + terms·f and the shortcuts' 2·width elements, which
at long sequences are most of a block's activations; with `train.sequence_parallel` the tokens a
rank holds fall with N too. The loss needs no tiling here: `train.fused_loss` already computes it in
chunks of tokens without forming the logits (pangu_pi/kernels/linear_cross_entropy.py), the one loss
path of the trainer. The model itself is not changed: the modules' `forward` is wrapped on the built
instance, so checkpoints and exports are those of the plain model.
"""

from __future__ import annotations

import math


def tile_token_wise_modules(model) -> int:
    """Wrap every PanGu-π FFN and augmented shortcut of `model` in TiledMLP; returns how many."""
    from pangu_pi.modeling import PanGuPiMLP, PanGuPiShortcut

    wrapped = 0
    for module in model.modules():
        if isinstance(module, (PanGuPiMLP, PanGuPiShortcut)) and not getattr(module, "_tiled", False):
            module.forward = _tiled(module, module.forward)
            module._tiled = True
            wrapped += 1
    return wrapped


def _tiled(module, plain):
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    params = list(module.parameters())

    def forward(x):
        tokens, width = x.shape[-2], x.shape[-1]
        if not torch.is_grad_enabled() or tokens <= width:
            return plain(x)  # nothing kept for backward, or a single tile: the plain call
        # DeepSpeed's tile: about `hidden` tokens, so a tile's intermediates are about the size of
        # one (hidden × hidden) matrix per intermediate width. Every rank holds the same number of
        # tokens (fixed-length rows), so the tile count agrees across ranks without a collective.
        return TiledMLP.apply(lambda _self, x_tile: plain(x_tile), module, x, math.ceil(tokens / width), params)

    return forward
