"""Documents inside packed rows: where each one starts, and attention that stays inside it.

Pretraining packs documents end to end (EOS between them) into rows of `data.seq_len` tokens. By
default a token attends to everything before it in the row, earlier documents included. With
`data.document_masking: true` each document is its own sequence: RoPE positions restart after every
EOS and the attention mask is block-diagonal (causal inside a document, nothing across). That matters
for long-context training, where a row holds a few long documents and a fact asked for near the end of
one must be found in that document, not in its neighbour. Fine-tuning rows are built this way always
(training/sft_data.py marks each chat with positions from 0).
"""

from __future__ import annotations

import torch


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) RoPE positions that restart at 0 on the token after each EOS (and at the row's start).

    The EOS itself ends its document, so it keeps the position after the document's last token."""
    B, T = input_ids.shape
    index = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    # The index of the latest document start at or before each token, by a running maximum.
    latest_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - latest_start


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, True where a query may attend a key: earlier-or-same positions of
    the same document, documents being the runs that start where the position id is 0."""
    segment = (position_ids == 0).cumsum(-1)  # (B, T)
    same = segment[:, :, None] == segment[:, None, :]
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def document_inputs(input_ids: torch.Tensor, eos_id: int, attn_implementation: str = "sdpa") -> dict:
    """Model keyword arguments for rows of packed documents kept apart: position_ids and, except
    for flash attention (which reads the boundaries from the positions), the block-causal mask."""
    positions = document_positions(input_ids, eos_id)
    out = {"position_ids": positions}
    if "flash" not in (attn_implementation or "sdpa"):
        out["attention_mask"] = block_causal_mask(positions)
    return out
