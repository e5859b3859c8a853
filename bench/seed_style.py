"""The loss as the original experiment wrote it (docs/spec.md), kept as the benchmark's baseline.

Everything the fused backends avoid is here on purpose: a full softmax ``[N, V]``, the
top-k of the probabilities, a gathered ``[N, K, H]`` copy of the embedding rows, an
``einsum`` for the expected embedding, and a cosine similarity, with forward and backward
left to autograd. Like the experiment (a float32 model), it computes in float32 whatever
the input dtype; its gradients come back in the inputs' dtypes.

The probabilities are not renormalised over the top-k: cosine is scale-invariant, so the
loss and its gradients are those of docs/spec.md's softmax over the selected entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def seed_style_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    embedding: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    topk: int | None = 256,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean over valid positions of ``alpha * (1 - cos_n) + (1 - alpha) * ce_n``.

    Args:
        logits: ``[N, V]``. labels: ``[N]`` (``ignore_index`` marks skipped positions).
        embedding: ``[V, H]``. topk: K, or None for the whole vocabulary.
    """
    z = logits.float()
    table = embedding.float()
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)

    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum") / n_valid
    if alpha == 0:
        return ce

    probs = torch.softmax(z / temperature, dim=-1)                       # [N, V]
    k = z.shape[-1] if topk is None else min(topk, z.shape[-1])
    top_probs, top_idx = probs.topk(k, dim=-1)                           # [N, K]
    gathered = table[top_idx]                                            # [N, K, H]
    mu = torch.einsum("nk,nkh->nh", top_probs, gathered)                 # [N, H]
    target = table[torch.where(valid, labels, 0)]                        # [N, H]
    dot = (mu * target).sum(dim=-1)
    cos = dot / (mu.norm(dim=-1).clamp_min(EPS) * target.norm(dim=-1).clamp_min(EPS))
    dist = torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum() / n_valid
    return alpha * dist + (1.0 - alpha) * ce
