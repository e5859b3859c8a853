"""The pure-PyTorch reference: the oracle for every backend and the fallback where none runs.

It computes SPEC.md literally with differentiable PyTorch ops, in float32 (float64 stays
float64), on any device. It never builds an ``[N, K, H]`` gather (the expected embedding
is an ``embedding_bag`` weighted sum) nor a softmax copy of the logits, except when the
top-k covers the whole vocabulary, where the expected embedding is a dense
``softmax(z / T) @ E`` (``N * V`` extra floats).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def select_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row; at the k-th value the lower index wins.

    ``torch.topk`` breaks ties in no documented order, so rows where the k-th value also
    occurs outside the chosen set are redone with a stable descending sort.
    """
    if torch.compiler.is_compiling():
        return _select_topk_traceable(z, k)
    idx = torch.topk(z, k, dim=-1).indices
    kth = z.gather(1, idx).amin(dim=-1, keepdim=True)
    ambiguous = (z >= kth).sum(dim=-1) > k
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        stable = torch.sort(z.index_select(0, rows), dim=-1, descending=True, stable=True).indices
        idx[rows] = stable[:, :k]
    return idx


def _select_topk_traceable(z: torch.Tensor, k: int) -> torch.Tensor:
    """``select_topk`` without a host sync or a data-dependent branch (the traced path).

    S is every entry above the k-th value plus, at the k-th value, the lowest indices
    (counted with a cumulative sum) to make k: exactly k members per row, whose indices
    are then those of the k ones of the membership mask (their order does not matter).
    A NaN counts as the largest value, as in ``torch.topk``.
    """
    kth = torch.topk(z, k, dim=-1).values[:, -1:]
    above = (z > kth) | torch.isnan(z)
    at = z == kth
    room = k - above.sum(dim=-1, keepdim=True)
    member = above | (at & (torch.cumsum(at.to(torch.int32), dim=-1) <= room))
    return torch.topk(member.to(z.dtype), k, dim=-1).indices


def expected_embedding(z: torch.Tensor, embedding: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """mu_n = sum over the top-k of row n of softmax(z[S] / T)_i * E[i], shape [N, H]."""
    if k >= z.shape[-1]:
        return tempered_softmax(z, temperature) @ embedding
    idx = select_topk(z, k)
    weights = tempered_softmax(z.gather(1, idx), temperature)
    return F.embedding_bag(idx, embedding, per_sample_weights=weights, mode="sum")


def tempered_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) over the last dim, computed as softmax((z - max z) / T).

    Subtracting the max before dividing keeps the rounding error of each exponent at
    eps * |z_i - max z| / T rather than eps * |z_i| / T, which matters at small T."""
    return torch.softmax((z - z.amax(dim=-1, keepdim=True).detach()) / temperature, dim=-1)


def cosine(mu: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(mu . e) / (max(|mu|, eps) * max(|e|, eps)) per row."""
    dot = (mu * e).sum(dim=-1)
    return dot / (mu.norm(dim=-1).clamp_min(EPS) * e.norm(dim=-1).clamp_min(EPS))


def reference_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    embedding: torch.Tensor,
    temperature: float,
    topk: int | None,
    ignore_index: int,
    with_cos: bool = True,
):
    """Per-position statistics of the mixed loss.

    Args:
        logits: ``[N, V]`` floating. labels: ``[N]`` integer. embedding: ``[V, H]``.
        topk: K, or None for the whole vocabulary. with_cos: False skips the cosine term
            (its rows are then zero).

    Returns:
        ``(ce, cos, correct)``, each ``[N]``: ce_n and cos_n in the compute dtype, zero at
        ignored positions, and whether argmax(z_n) == y_n.
    """
    dtype = compute_dtype(logits.dtype)
    n, vocab = logits.shape
    k = vocab if topk is None else min(topk, vocab)
    if torch.compiler.is_compiling():
        return _reference_rows_traceable(logits, labels, embedding, temperature, k, ignore_index, with_cos, dtype)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    # Ignored rows are left out (their logits may be anything, NaN included, and get exact
    # zero gradients); when every row is valid the logits are used without a copy.
    all_valid = rows.numel() == n
    z = (logits if all_valid else logits.index_select(0, rows)).to(dtype)
    y = (labels if all_valid else labels.index_select(0, rows)).long()

    ce = torch.logsumexp(z, dim=-1) - z.gather(1, y[:, None]).squeeze(1)
    correct = z.argmax(dim=-1) == y
    if with_cos:
        table = embedding.to(dtype)
        cos = cosine(expected_embedding(z, table, temperature, k), table.index_select(0, y))
    else:
        cos = torch.zeros_like(ce)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values if all_valid else values.new_zeros(n).index_copy(0, rows, values)

    return scatter(ce), scatter(cos), scatter(correct)


def _reference_rows_traceable(logits, labels, embedding, temperature, k, ignore_index, with_cos, dtype):
    """``reference_rows`` with static shapes (the traced path): ignored rows are masked to
    zero logits and label 0 instead of being left out (so NaN in them stays out, and their
    gradients are exact zeros through ``torch.where``), and their results are zeroed."""
    valid = labels != ignore_index
    zero = torch.zeros((), device=logits.device, dtype=dtype)
    z = torch.where(valid[:, None], logits.to(dtype), zero)
    y = torch.where(valid, labels.long(), torch.zeros_like(labels, dtype=torch.long))

    ce = torch.logsumexp(z, dim=-1) - z.gather(1, y[:, None]).squeeze(1)
    correct = (z.argmax(dim=-1) == y) & valid
    if with_cos:
        table = embedding.to(dtype)
        cos = cosine(expected_embedding(z, table, temperature, k), table.index_select(0, y))
        cos = torch.where(valid, cos, zero)
    else:
        cos = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), cos, correct
