"""The kernel-backend protocol: what a backend module provides to take part in the loss.

A backend is a module with the functions of :class:`KernelBackend` (``native.py``,
``triton_ops``, and ``reference_backend.py`` for the fused-linear mode); ``backends.py``
finds them and ``autograd.py`` / ``linear_autograd.py`` / ``compile_ops.py`` drive them.

The inputs arrive as ``logits [N, V]`` with unit stride along V, ``labels [N]`` int64 and
``embedding [V, H]`` contiguous (``autograd.kernel_layouts``), and one
:class:`~fused_cosloss.options.LossOptions`. Per-position outputs are float32 (float64 for
float64 logits): ce_n and cos_n are zero at ignored positions, cos is zero everywhere when
``options.with_cos`` is False.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from .options import LossOptions


class RowsForward(NamedTuple):
    """What ``forward_rows`` returns: ``[N]`` ce_n, cos_n, argmax == label (bool), lse_n (the
    log-sum-exp of the transformed row, what the z-loss squares), and the state the backward
    needs (a tuple of tensors of a fixed arity per backend and ``with_cos``; O(N * (K + H))
    memory at most). ce, cos and lse are 0 at ignored positions."""

    ce: torch.Tensor
    cos: torch.Tensor
    correct: torch.Tensor
    lse: torch.Tensor
    saved: tuple


class ShardRows(NamedTuple):
    """What ``shard_rows`` returns for one rank's shard of a vocabulary sharded across processes
    (``vocab_parallel.py``), in one pass over the shard's logits: per row the shift (the maximum of
    z', or 0 where that is infinite, as ``torch.logsumexp`` shifts) and ``log sum exp(z' - shift)``
    (float32; -inf for a row of -inf), the shard's k best
    entries by z' (local indices ``[N, k]`` int64, in any order, the tie rule of docs/spec.md), and
    the state ``backward_rows`` takes with the cross-entropy-only options (``with_cos=False``, the
    same labels) to write the gradient of the log-sum-exp."""

    row_max: torch.Tensor
    log_sum: torch.Tensor
    candidates: torch.Tensor
    saved: tuple


class KernelBackend(Protocol):
    """The functions of a backend module (``forward_backward_rows`` and ``shard_rows`` are optional)."""

    def unavailable_reason(self, logits: torch.Tensor, embedding: torch.Tensor) -> Optional[str]:
        """Why it cannot run on these tensors (device, dtype, missing build), or None."""

    def forward_rows(self, logits, labels, embedding, options: LossOptions) -> RowsForward:
        """The per-position terms and the saved state."""

    def fake_forward_rows(self, logits, labels, embedding, options: LossOptions) -> RowsForward:
        """Empty tensors of the shapes, dtypes and devices ``forward_rows`` returns (the fake
        kernel of the ``torch.compile`` custom op, ``compile_ops.py``; the kernel backends only:
        the reference is traced as it is)."""

    def backward_rows(self, logits, labels, embedding, saved: tuple, grad_ce, grad_cos, options: LossOptions, *,
                      need_logits_grad: bool, need_embedding_grad: bool, inplace: bool = False,
                      embedding_grad_out: Optional[torch.Tensor] = None, grad_lse: Optional[torch.Tensor] = None):
        """``(dlogits, dembedding)``: the gradients (docs/spec.md) of
        ``sum_n grad_ce[n] * ce_n + grad_cos[n] * cos_n + grad_lse[n] * lse_n`` (``grad_*`` ``[N]``
        float32/float64; ``grad_lse`` None: no lse term) in the dtypes of logits and embedding,
        None where not needed (the embedding's always when ``with_cos`` is False). ``inplace``:
        the logits gradient is written over ``logits`` and that tensor returned.
        ``embedding_grad_out``: a float32 ``[V, H]`` tensor the embedding gradient is added to
        unrounded (None is then returned for it)."""

    def shard_rows(self, logits, labels, options: LossOptions, k: int) -> Optional[ShardRows]:
        """The statistics and the k best candidates of a shard (see ``ShardRows``), or None where the
        backend cannot give them in its pass (``vocab_parallel.py`` then selects them itself)."""


def forward_backward_rows(ops, logits, labels, embedding, grad_ce, grad_cos, options: LossOptions, *,
                          need_logits_grad: bool, need_embedding_grad: bool, inplace: bool = False,
                          embedding_grad_out: Optional[torch.Tensor] = None,
                          grad_lse_square: Optional[torch.Tensor] = None):
    """``(RowsForward without saved, dlogits, dembedding)`` as ``(ce, cos, correct, lse, dlogits,
    dembedding)``: ``forward_rows`` and ``backward_rows`` for coefficients known in the forward,
    ``grad_ce`` / ``grad_cos`` on ce_n / cos_n and ``grad_lse_square`` on lse_n ** 2 (the z-loss:
    the lse coefficient is then ``2 * grad_lse_square * lse_n``, known once the row's lse is).
    A backend that can write the gradient in the pass that reads the logits (Triton) provides
    ``forward_backward_rows`` with these arguments; for the others it is composed from the two
    calls."""
    kwargs = dict(need_logits_grad=need_logits_grad, need_embedding_grad=need_embedding_grad, inplace=inplace,
                  embedding_grad_out=embedding_grad_out)
    fused = getattr(ops, "forward_backward_rows", None)
    if fused is not None:
        return fused(logits, labels, embedding, grad_ce, grad_cos, options, grad_lse_square=grad_lse_square, **kwargs)
    ce, cos, correct, lse, saved = ops.forward_rows(logits, labels, embedding, options)
    grad_lse = None if grad_lse_square is None else 2.0 * grad_lse_square * lse
    dlogits, dembedding = ops.backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options,
                                            grad_lse=grad_lse, **kwargs)
    return ce, cos, correct, lse, dlogits, dembedding
