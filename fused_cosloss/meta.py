"""The loss on meta tensors (shape inference, ``torch.device("meta")`` model init): no values to
check or compute, only outputs of the shapes and dtypes a real call returns.

No backend runs. The per-position rows are zeros that depend on the inputs the way the real
rows do (ce on the logits, cos also on the embedding), so that a backward gives meta
gradients of the inputs' shapes.
"""
from __future__ import annotations

import torch

from .reference import compute_dtype


def meta_rows(per_position: torch.Tensor, shared=(), cos_shared=(), *, with_cos: bool):
    """``(ce_rows, cos_rows, correct, lse_rows)`` as meta tensors for the ``N`` rows of ``per_position``
    (the ``[N, V]`` logits or the ``[N, H]`` hidden states); ``shared``: other inputs both
    terms depend on (the LM head weight, its bias), ``cos_shared``: those only the cosine does
    (the embedding)."""
    dtype = compute_dtype(per_position.dtype)
    ce = _zero(per_position.sum(dim=-1), dtype)
    for tensor in shared:
        ce = ce + _zero(tensor.sum(), dtype)
    cos = ce
    if with_cos:
        for tensor in cos_shared:
            cos = cos + _zero(tensor.sum(), dtype)
    correct = torch.zeros(per_position.shape[0], dtype=torch.bool, device=per_position.device)
    return ce, cos, correct, ce


def _zero(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) * 0
