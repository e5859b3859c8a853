"""The benchmark's inputs: deterministic, several sets per shape, no ties at the top-k boundary.

Logits are ``LOGIT_STD * randn`` (roughly what a trained LM head gives); one position in
``IGNORE_EVERY`` carries ``ignore_index`` as padding would. Rows are adjusted so the K-th
largest logit is at least ``BOUNDARY_GAP`` above the (K+1)-th: the top-k set is then
unique, and every correct implementation selects the same one whatever its tie-breaking
or its dtype (bfloat16 logits tie often). The few entries moved are set one unit below
the K-th value, so the distribution is otherwise untouched.

Implementations that take hidden states (a linear + CE kernel such as cut-cross-entropy)
get ``hidden [N, H]`` scaled so that ``hidden @ embedding.T`` has about the same spread.
"""
from __future__ import annotations

import math

import torch

LOGIT_STD = 2.0
EMBED_STD = 0.02
IGNORE_INDEX = -100
IGNORE_EVERY = 32
BOUNDARY_GAP = 1e-2
_ROWS_PER_CHUNK = 4096


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_embedding(vocab: int, hidden: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """The tied embedding ``E [V, H]``, the same for every set and every token count."""
    gen = generator(torch.device(device), seed)
    table = torch.randn(vocab, hidden, generator=gen, device=device, dtype=torch.float32) * EMBED_STD
    return table.to(dtype)


def make_labels(n_tokens: int, vocab: int, device, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
    labels[IGNORE_EVERY // 2 :: IGNORE_EVERY] = IGNORE_INDEX
    return labels


def make_logits(n_tokens: int, vocab: int, topk: int | None, dtype: torch.dtype, device, gen) -> torch.Tensor:
    logits = torch.empty(n_tokens, vocab, device=device, dtype=dtype)
    for start in range(0, n_tokens, _ROWS_PER_CHUNK):
        rows = logits[start : start + _ROWS_PER_CHUNK]
        chunk = torch.randn(rows.shape, generator=gen, device=device, dtype=torch.float32) * LOGIT_STD
        rows.copy_(chunk)
        if topk is not None and topk < vocab:
            separate_topk_boundary(rows, topk)
    return logits


@torch.no_grad()
def separate_topk_boundary(rows: torch.Tensor, k: int, gap: float = BOUNDARY_GAP) -> int:
    """In place: make the k-th largest value of each row exceed every value outside the top-k
    by at least ``gap``; returns how many entries were moved."""
    values = rows.float()
    kth_values, top_idx = values.topk(k, dim=-1)
    kth = kth_values[:, -1:]
    keep = torch.zeros_like(values, dtype=torch.bool).scatter_(1, top_idx, True)
    move = ~keep & (values > kth - gap)
    moved = int(move.sum())
    if moved:
        rows.copy_(torch.where(move, kth - 1.0, values))
    return moved


def make_hidden(n_tokens: int, hidden: int, dtype: torch.dtype, device, gen) -> torch.Tensor:
    scale = LOGIT_STD / (EMBED_STD * math.sqrt(hidden))
    return (torch.randn(n_tokens, hidden, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def make_set(kind: str, n_tokens: int, vocab: int, hidden: int, topk: int | None, dtype: torch.dtype,
             device, seed: int, index: int) -> dict:
    """Input set number ``index`` for ``n_tokens`` positions: ``{"labels", "logits"}`` or
    ``{"labels", "hidden"}`` (``kind`` = "logits" or "hidden"); the embedding is added by the caller."""
    gen = generator(torch.device(device), seed * 1_000_003 + n_tokens * 101 + index)
    labels = make_labels(n_tokens, vocab, device, gen)
    if kind == "hidden":
        return {"labels": labels, "hidden": make_hidden(n_tokens, hidden, dtype, device, gen)}
    return {"labels": labels, "logits": make_logits(n_tokens, vocab, topk, dtype, device, gen)}
