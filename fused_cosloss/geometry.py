"""The geometry of a token-embedding table: does training spread the tokens out or pull them together?

The cosine term moves embedding rows (directly, for the rows it reads, and through the LM head
when the embedding is tied). Its failure mode is a collapse: every row turning the same way,
so that any prediction has cosine 1 with any target. These measures show it, over a fixed
sample of token ids so that tables before and after training compare row for row:

* the mean pairwise cosine of the sampled rows (1: one direction; near 0: spread out);
* the effective rank (Roy and Vetterli, 2007): exp of the entropy of the normalised singular
  values of the sampled rows, from 1 (rank one) to the sample size or H;
* the relative change of the sampled rows between two tables, ``|after - before| / |before|``
  (Frobenius norms).

Each is reported for the tokens seen in training and for the rest, which only the tied LM head's
gradient (the softmax's) moves. All of it is computed in float64 on the table's device.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-12
SAMPLE_SIZE = 2048


def token_sample(ids: torch.Tensor, size: int = SAMPLE_SIZE, seed: int = 0) -> torch.Tensor:
    """At most ``size`` of ``ids`` (1-D, int), drawn without replacement by a fixed generator and sorted,
    so that the same ids give the same sample on every machine."""
    ids = ids.reshape(-1).long().cpu()
    if ids.numel() <= size:
        return ids.sort().values
    generator = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(ids.numel(), generator=generator)[:size]].sort().values


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """The mean of cos(r_i, r_j) over the ordered pairs i != j of ``rows [n, H]`` (NaN for n < 2),
    as ``(|sum u_i|^2 - sum |u_i|^2) / (n (n - 1))`` with u_i = r_i / max(|r_i|, eps): O(n H)."""
    n = rows.shape[0]
    if n < 2:
        return math.nan
    rows = rows.double()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(EPS)
    total = unit.sum(dim=0)
    return float((total @ total - (unit * unit).sum()) / (n * (n - 1)))


def effective_rank(rows: torch.Tensor) -> float:
    """exp(-sum p_i log p_i) with p the singular values of ``rows`` divided by their sum (NaN when all are 0)."""
    singular = torch.linalg.svdvals(rows.double())
    total = singular.sum()
    if not total > 0:
        return math.nan
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """|after - before| / |before| (Frobenius norms, float64; NaN when ``before`` is zero)."""
    before, after = before.double(), after.double()
    norm = before.norm()
    return float((after - before).norm() / norm) if norm > 0 else math.nan


def split_by_seen(vocab: int, seen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids ``{"seen": ..., "unseen": ...}`` of a vocabulary of ``vocab``, from ``seen``: the ids
    that occur in the training data (any shape; negative ids such as ignore_index are skipped)."""
    seen = seen.reshape(-1).long().cpu()
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[seen[(seen >= 0) & (seen < vocab)]] = True
    ids = torch.arange(vocab)
    return {"seen": ids[mask], "unseen": ids[~mask]}


def embedding_geometry(table: torch.Tensor, groups: dict[str, torch.Tensor], *, before: torch.Tensor | None = None,
                       size: int = SAMPLE_SIZE, seed: int = 0) -> dict[str, dict]:
    """For each group of token ids (e.g. :func:`split_by_seen`'s): its size, the sample's size, mean
    pairwise cosine and effective rank, and, given the table ``before`` training, the sample's
    relative change."""
    table = table.detach()
    report = {}
    for name, ids in groups.items():
        sample = token_sample(ids, size, seed).to(table.device)
        rows = table.index_select(0, sample)
        entry = {"tokens": int(ids.numel()), "sample": int(sample.numel()),
                 "mean_pairwise_cosine": mean_pairwise_cosine(rows),
                 "effective_rank": effective_rank(rows) if sample.numel() else math.nan}
        if before is not None:
            entry["relative_change"] = relative_change(before.detach().index_select(0, sample), rows)
        report[name] = entry
    return report
