"""The Triton backend (``backend="triton"``): the kernel-backend protocol of
``fused_cosloss.protocol`` over the kernels of this package.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (the interpreter: slow, for tests). Logits and embedding may each
be float32, bfloat16 or float16; all arithmetic is float32. Design and cost model:
docs/triton_kernel.md. Files: each kernel beside its launcher (``forward.py``,
``backward.py``, ``embedding_grad.py``), the dense path (``dense.py``), the host-side sort
(``grouping.py``), the tuning knobs (``config.py``), the tile sizes they give (``tiles.py``)
and the saved state's named columns (``layout.py``).

* sparse path (``k <= CONFIG.sparse_max_k`` = 1024). Forward: ``row_stats_kernel`` (logsumexp,
  argmax, radix top-k) -> ``cosine_kernel`` (mu over the k gathered rows, cos). Saved between
  forward and backward (``TritonSaved``): S's indices (int16 up to V = 65536, else int32) and
  values ``[N, k]`` and eight scalars per row (not mu).
  Backward: ``backward_rows_kernel`` (the logits gradient outside S) -> the entries of S
  grouped by vocabulary row (``grouping.grouped_entries``) -> per chunk of H columns,
  ``direction_chunk_kernel`` (mu recomputed, g = d cos / d mu) and ``embedding_grad_kernel``
  (the vocabulary pass: s = E[v] . g summed over the chunks, and dE, no atomics) ->
  ``selected_grad_kernel`` (s_bar = sum_S w s per row, the logits gradient on S).
* dense path (``k > CONFIG.sparse_max_k``, e.g. ``topk=None`` on a real vocabulary): the row
  kernel finds the threshold of S, and the cosine term goes through matrix products with E
  (``dense.py``).
* ``with_cos=False``: only logsumexp / argmax in the forward and the dense CE gradient.
* the loss options (``LossOptions.logit_scale``, ``softcap``, ``label_smoothing``): every kernel
  that reads a logit turns it into z' as it loads it (``transform.py``); each is a constexpr flag
  of the kernels, off at its default. lse_n is ``max + log_sum`` of the saved statistics, and the
  z-loss's coefficient ``2 grad_lse_square lse_n`` is formed in the row kernel's gradient pass.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..options import LossOptions
from ..protocol import RowsForward, ShardRows
from . import tiles
from .backward import cosine_backward, launch_backward_rows
from .config import CONFIG
from .dense import dense_backward, dense_forward
from .forward import launch_cosine, launch_row_stats
from .layout import COS_VALUE, ROW_WIDTH, STAT_LOG_SUM, STAT_MAX, TritonSaved, host_column, index_dtype
from .tiles import CE_ONLY, DENSE, SPARSE

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(logits: torch.Tensor, embedding: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on these tensors, or None."""
    for name, tensor in (("logits", logits), ("embedding", embedding)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {tensor.dtype} is not supported (float32, bfloat16, float16)"
    device = logits.device.type
    if device == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "triton needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if not tiles.interpreted():
            return "TRITON_INTERPRET=1 was set after triton compiled the kernels; set it before importing triton"
        return None
    return f"triton does not run on {device} tensors"


def _mode(options: LossOptions) -> int:
    """The row kernel's mode: CE_ONLY, SPARSE (k <= CONFIG.sparse_max_k) or DENSE."""
    if not options.with_cos:
        return CE_ONLY
    return SPARSE if options.k <= CONFIG.sparse_max_k else DENSE


def forward_rows(logits, labels, embedding, options: LossOptions) -> RowsForward:
    """ce, cos, correct, lse and the saved state (``TritonSaved``)."""
    return _forward(logits, labels, embedding, options)


def _lse(stats):
    """lse_n = max + log sum exp(z' - max) of the saved statistics (both 0 at ignored rows), in float32."""
    return host_column(stats, STAT_MAX) + host_column(stats, STAT_LOG_SUM)


def _forward(logits, labels, embedding, options: LossOptions, gradient=None) -> RowsForward:
    """forward_rows; with ``gradient = (grad_ce, grad_cos, grad_lse_square, dlogits)`` the row kernel
    also writes the logits gradient outside S into ``dlogits`` (which may be the logits)."""
    n, vocab = logits.shape
    hidden = embedding.shape[1]
    device = logits.device
    mode = _mode(options)
    k = options.k
    ce = torch.empty(n, device=device, dtype=torch.float32)
    correct = torch.empty(n, device=device, dtype=torch.int8)
    stats = torch.empty(n, ROW_WIDTH.value, device=device, dtype=torch.float32)
    tie = torch.empty(n, device=device, dtype=torch.int32)
    sparse = mode == SPARSE
    s_shape = (n, k) if sparse else (0,)
    # S's indices are written in 32 bits (an int16 store costs the row kernel registers and spills)
    s_idx = torch.empty(s_shape, device=device, dtype=torch.int32)
    s_val = torch.empty(s_shape, device=device, dtype=logits.dtype)  # exact: they are logits
    if n > 0:
        launch_row_stats(logits, labels, ce=ce, correct=correct, stats=stats, tie=tie,
                         s_idx=s_idx if sparse else None, s_val=s_val if sparse else None, mode=mode, options=options,
                         gradient=gradient)
    if sparse:
        s_idx = s_idx.to(index_dtype(vocab))  # saved in 16 bits while V allows
    mu = torch.empty(0, hidden, device=device)  # kept by the dense path only
    cstats = torch.empty(0, ROW_WIDTH.value, device=device)  # the COS_* columns, with the cosine term
    if mode == SPARSE:
        cstats = torch.empty(n, ROW_WIDTH.value, device=device, dtype=torch.float32)
        if n > 0:
            launch_cosine(embedding, labels, stats=stats, s_idx=s_idx, s_val=s_val, cstats=cstats, options=options)
    elif mode == DENSE and n > 0:
        mu, cstats = dense_forward(logits, labels, embedding, stats, tie, options)
    if options.with_cos:
        cos = host_column(cstats, COS_VALUE).clone()
    else:
        cos = torch.zeros(n, device=device, dtype=torch.float32)
    return RowsForward(ce, cos, correct.bool(), _lse(stats), TritonSaved(stats, tie, s_idx, s_val, mu, cstats))


def shard_rows(logits, labels, options: LossOptions, k: int) -> ShardRows | None:
    """The shard's statistics and k best candidates (``protocol.ShardRows``) from the row kernel's
    sparse pass alone (no cosine kernel); None when k is past the sparse path (``CONFIG.sparse_max_k``)."""
    if k > CONFIG.sparse_max_k:
        return None
    n, device = logits.shape[0], logits.device
    selecting = dataclasses.replace(options, k=k, with_cos=True, label_smoothing=0.0)
    stats = torch.zeros(n, ROW_WIDTH.value, device=device, dtype=torch.float32)
    tie = torch.zeros(n, device=device, dtype=torch.int32)
    s_idx = torch.zeros(n, k, device=device, dtype=torch.int32)
    s_val = torch.empty(n, k, device=device, dtype=logits.dtype)
    if n > 0:
        launch_row_stats(logits, labels, ce=torch.empty(n, device=device, dtype=torch.float32),
                         correct=torch.empty(n, device=device, dtype=torch.int8), stats=stats, tie=tie, s_idx=s_idx,
                         s_val=s_val, mode=SPARSE, options=selecting)
    row_max, log_sum = host_column(stats, STAT_MAX), host_column(stats, STAT_LOG_SUM)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    log_sum = torch.where(torch.isneginf(row_max), row_max, log_sum)
    # the saved state of a cross-entropy-only forward: the statistics (the rest is empty)
    saved = TritonSaved(stats, tie, torch.empty(0, device=device, dtype=torch.int32),
                        torch.empty(0, device=device, dtype=logits.dtype), torch.empty(0, 0, device=device),
                        torch.empty(0, ROW_WIDTH.value, device=device))
    return ShardRows(shift, log_sum, s_idx.long(), tuple(saved))


def fake_forward_rows(logits, labels, embedding, options: LossOptions) -> RowsForward:
    """Empty tensors of the shapes and dtypes ``forward_rows`` returns (the custom op's fake kernel)."""
    n, vocab = logits.shape
    k, hidden, device = options.k, embedding.shape[1], logits.device
    mode = _mode(options)
    s_shape = (n, k) if mode == SPARSE else (0,)

    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, device=device, dtype=dtype)

    saved = TritonSaved(
        stats=empty(n, ROW_WIDTH.value),
        tie=empty(n, dtype=torch.int32),
        s_idx=empty(*s_shape, dtype=index_dtype(vocab) if mode == SPARSE else torch.int32),
        s_val=empty(*s_shape, dtype=logits.dtype),
        mu=empty(n if mode == DENSE else 0, hidden),
        cstats=empty(n if options.with_cos else 0, ROW_WIDTH.value),
    )
    return RowsForward(empty(n), empty(n), empty(n, dtype=torch.bool), empty(n), saved)


def backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options: LossOptions, *,
                  need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None, grad_lse=None):
    """(dlogits, dembedding) from the saved state (a ``TritonSaved`` or its six tensors in order);
    ``grad_lse``: the coefficients of lse_n, or None."""
    saved = TritonSaved(*saved)
    n, vocab = logits.shape
    grad_ce = grad_ce.to(torch.float32).contiguous()
    grad_cos = grad_cos.to(torch.float32).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    want_demb = need_embedding_grad and options.with_cos
    if n == 0:
        dlogits = (logits if inplace else torch.zeros_like(logits)) if need_logits_grad else None
        demb = torch.zeros_like(embedding) if want_demb and embedding_grad_out is None else None
        return dlogits, demb
    if _mode(options) == DENSE:
        return dense_backward(logits, labels, embedding, saved, grad_ce, grad_cos, options,
                              need_logits_grad=need_logits_grad, want_demb=want_demb, inplace=inplace,
                              embedding_grad_out=embedding_grad_out, grad_lse=grad_lse)
    dlogits = None
    if need_logits_grad:
        # outside S; the vocabulary pass writes S's entries
        dlogits = logits if inplace else torch.empty(n, vocab, device=logits.device, dtype=logits.dtype)
        launch_backward_rows(logits, labels, grad_ce=grad_ce, grad_cos=grad_cos, stats=saved.stats, tie=saved.tie,
                             dlogits=dlogits, options=options, grad_lse=grad_lse)
    demb = None
    if options.with_cos and (need_logits_grad or want_demb):
        demb = cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, options, dlogits=dlogits,
                               want_demb=want_demb, embedding_grad_out=embedding_grad_out, grad_lse=grad_lse)
    return dlogits, demb


def forward_backward_rows(logits, labels, embedding, grad_ce, grad_cos, options: LossOptions, *,
                          need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None,
                          grad_lse_square=None):
    """``forward_rows`` and ``backward_rows`` in one call, for a loss whose per-row coefficients
    ``grad_ce`` / ``grad_cos`` (and ``grad_lse_square`` on lse_n ** 2, the z-loss, or None) are known
    in the forward (-> ce, cos, correct, lse, dlogits, dembedding). The row kernel writes the
    gradient outside S in its last pass over each row (read from L2, just read), so the logits
    are read from device memory once, as Liger-Kernel's cross-entropy does; the z-loss's
    coefficient 2 grad_lse_square lse_n is formed there, the row's lse being known by then. The
    cosine term's share follows as in ``backward_rows``."""
    n, vocab = logits.shape
    backward_options = dict(need_logits_grad=need_logits_grad, need_embedding_grad=need_embedding_grad,
                            inplace=inplace, embedding_grad_out=embedding_grad_out)
    if grad_lse_square is not None:
        grad_lse_square = grad_lse_square.to(torch.float32).contiguous()
    if not need_logits_grad or n == 0 or _mode(options) == DENSE:
        ce, cos, correct, lse, saved = forward_rows(logits, labels, embedding, options)
        grad_lse = None if grad_lse_square is None else 2.0 * grad_lse_square * lse
        dlogits, demb = backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options,
                                      grad_lse=grad_lse, **backward_options)
        return ce, cos, correct, lse, dlogits, demb
    grad_ce = grad_ce.to(torch.float32).contiguous()
    grad_cos = grad_cos.to(torch.float32).contiguous()
    dlogits = logits if inplace else torch.empty(n, vocab, device=logits.device, dtype=logits.dtype)
    ce, cos, correct, lse, saved = _forward(logits, labels, embedding, options,
                                            gradient=(grad_ce, grad_cos, grad_lse_square, dlogits))
    demb = None
    if options.with_cos:
        # S's entries: the same coefficient as the row kernel formed, (2 grad_lse_square) lse
        grad_lse = None if grad_lse_square is None else 2.0 * grad_lse_square * lse
        demb = cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, options, dlogits=dlogits,
                               want_demb=need_embedding_grad, embedding_grad_out=embedding_grad_out,
                               grad_lse=grad_lse)
    return ce, cos, correct, lse, dlogits, demb
