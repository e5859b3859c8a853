"""The reference as a kernel backend (the protocol of ``protocol.py``).

``mixed_loss`` calls the reference directly and lets autograd differentiate it; the
fused-linear path instead drives every backend through ``forward_rows`` /
``backward_rows`` one chunk of logits at a time, and this module is how the reference
takes part: the forward runs without a graph, the backward runs the forward again on
the chunk under autograd and differentiates it (the chunk's graph lives only that long).
It never runs under ``torch.compile`` (there the reference is traced as it is), so it has no
``fake_forward_rows``.
"""
from __future__ import annotations

import torch

from .options import LossOptions
from .protocol import RowsForward
from .reference import compute_dtype, reference_rows


def unavailable_reason(logits: torch.Tensor, embedding: torch.Tensor) -> str | None:
    return None


def forward_rows(logits, labels, embedding, options: LossOptions) -> RowsForward:
    """Per-row ce, cos, correct, lse of the reference; nothing is saved (the backward recomputes)."""
    with torch.no_grad():
        ce, cos, correct, lse = reference_rows(logits, labels, embedding, options)
    return RowsForward(ce, cos, correct, lse, ())


def backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options: LossOptions, *,
                  need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None, grad_lse=None):
    """Gradients of sum_n grad_ce[n] ce_n + grad_cos[n] cos_n (+ grad_lse[n] lse_n), by autograd of the recomputed rows
    (``inplace``: copied into the logits' storage; ``embedding_grad_out``: added to that tensor).

    The embedding is differentiated as the compute-dtype (float32) table the rows use, so that the
    chunk's embedding gradient reaches ``embedding_grad_out`` unrounded: a bfloat16 table's gradient
    rounded to bfloat16 chunk by chunk would add one rounding per chunk to the accumulated sum."""
    with_cos = options.with_cos
    need_embedding_grad = need_embedding_grad and with_cos
    storage, embedding_dtype = logits, embedding.dtype
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(need_logits_grad)
        table = embedding.detach().to(compute_dtype(logits.dtype)).requires_grad_(need_embedding_grad)
        ce, cos, _, lse = reference_rows(logits, labels, table, options)
        objective = (grad_ce.to(ce.dtype) * ce).sum()
        if with_cos:
            objective = objective + (grad_cos.to(cos.dtype) * cos).sum()
        if grad_lse is not None:
            objective = objective + (grad_lse.to(lse.dtype) * lse).sum()
        inputs = [t for t, needed in ((logits, need_logits_grad), (table, need_embedding_grad)) if needed]
        if inputs and objective.requires_grad:
            grads = list(torch.autograd.grad(objective, inputs, allow_unused=True))
        else:  # every row ignored: the objective is a constant
            grads = [None] * len(inputs)
    dlogits = _zero_if_none(grads.pop(0), logits) if need_logits_grad else None
    dembedding = _zero_if_none(grads.pop(0), table) if need_embedding_grad else None
    if inplace and dlogits is not None:
        dlogits = storage.copy_(dlogits)
    if embedding_grad_out is not None and dembedding is not None:
        embedding_grad_out += dembedding
        dembedding = None
    return dlogits, None if dembedding is None else dembedding.to(embedding_dtype)


def _zero_if_none(grad, like):
    """A gradient autograd reports as unused (every row ignored) is zero."""
    return torch.zeros_like(like) if grad is None else grad
