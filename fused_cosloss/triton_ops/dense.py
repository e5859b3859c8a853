"""The dense path (k > ``CONFIG.sparse_max_k``, e.g. ``topk=None`` on a real vocabulary): S is
given by the threshold the forward's row kernel found (``STAT_THRESHOLD`` and ``tie``: "v in
S" as an elementwise test), and the cosine term goes through matrix products with E, in
blocks of rows of at most ``CONFIG.dense_block_elements`` logits.

Extra memory: mu ``[N, H]`` float32 (saved), a few ``[rows, V]`` float32 temporaries, a float32
copy of E when E is 16-bit, and a float32 ``[V, H]`` accumulator of dE. The target entries of
dE go through the vocabulary pass of embedding_grad.py (with no entries of S).

With a scale or a cap (docs/spec.md, "Loss options") the blocks are of z', written by
``transformed_block_kernel`` with the row kernel's own helper (transform.py), so that the
membership test compares the very z' the row kernel found the threshold of; the backward's
block also gets dz'/dz (one more ``[rows, V]`` float32 temporary).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouping
from .config import CONFIG
from .embedding_grad import launch_vocabulary_pass
from .layout import (COS_DOT, COS_NORM_E, COS_NORM_MU, COS_VALUE, ROW_WIDTH, STAT_LOG_SUM, STAT_MAX, STAT_S_SUM,
                     STAT_THRESHOLD, host_column)
from .tiles import next_pow2, row_block
from .transform import transform_args, transformed_with_slope, transforms

EPS = 1e-12


def _blocks(n: int, vocab: int):
    """(start, end) of the blocks of rows."""
    rows = max(1, CONFIG.dense_block_elements // max(vocab, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


@triton.jit
def transformed_block_kernel(logits_ptr, stride_row, out_ptr, slope_ptr, V, scale, inv_cap, cap,
                             SCALE: tl.constexpr, CAP: tl.constexpr, BV: tl.constexpr):
    """z' (and, when ``slope_ptr`` is given, dz'/dz) of one row's block of BV logits, into [rows, V] float32."""
    row = tl.cast(tl.program_id(0), tl.int64)
    offs = tl.program_id(1) * BV + tl.arange(0, BV)
    inside = offs < V
    z = tl.load(logits_ptr + row * stride_row + offs, mask=inside, other=0.0).to(tl.float32)
    z, slope = transformed_with_slope(z, scale, inv_cap, cap, SCALE, CAP)
    tl.store(out_ptr + row * V + offs, z, mask=inside)
    if slope_ptr is not None:
        tl.store(slope_ptr + row * V + offs, slope, mask=inside)


def _row_values(logits, options, with_slope=False):
    """The rows' z' as float32 ``[rows, V]`` (the logits widened without a scale or cap), and dz'/dz
    when ``with_slope`` (None without a scale or cap: the slope is 1)."""
    if not transforms(options):
        return logits.float(), None
    rows, vocab = logits.shape
    values = torch.empty(rows, vocab, device=logits.device, dtype=torch.float32)
    slope = torch.empty_like(values) if with_slope else None
    if rows > 0:
        block = row_block(vocab)
        transformed_block_kernel[(rows, triton.cdiv(vocab, block))](
            logits_ptr=logits, stride_row=logits.stride(0), out_ptr=values, slope_ptr=slope, V=vocab,
            **transform_args(options), BV=block)
    return values, slope


def _ce_gradient(z, z_max, log_sum, labels, grad_ce, grad_lse, smoothing):
    """d/dz' of grad_ce * ce + grad_lse * lse ([rows, V] float32; labels valid or 0): grad_ce (p - [v == y])
    without the options, (grad_ce + grad_lse) p - grad_ce ((1 - smoothing) [v == y] + smoothing / V) with them."""
    rows = torch.arange(z.shape[0], device=z.device)
    dz = torch.exp((z - z_max) - log_sum)
    if grad_lse is None and smoothing == 0.0:
        dz[rows, labels] -= 1.0
        return grad_ce[:, None] * dz
    target = torch.zeros_like(dz)
    target[rows, labels] = 1.0 - smoothing
    if smoothing != 0.0:
        target += smoothing / z.shape[1]
    coefficient = grad_ce if grad_lse is None else grad_ce + grad_lse
    return coefficient[:, None] * dz - grad_ce[:, None] * target


def _weights(z, stats, tie, temperature, valid):
    """softmax over S at temperature T, as a dense [rows, V] float32 (zero outside S)."""
    t_val = host_column(stats, STAT_THRESHOLD)[:, None]
    positions = torch.arange(z.shape[1], device=z.device)
    member = (z > t_val) | ((z == t_val) & (positions[None, :] <= tie[:, None])) | torch.isnan(z)
    member &= valid[:, None]
    z_max, s_sum = host_column(stats, STAT_MAX)[:, None], host_column(stats, STAT_S_SUM)[:, None]
    weights = torch.exp((z - z_max) / temperature) / s_sum
    return torch.where(member, weights, torch.zeros((), device=z.device))


def _float_table(embedding):
    return embedding if embedding.dtype == torch.float32 else embedding.float()


def dense_forward(logits, labels, embedding, stats, tie, options):
    """(mu [N, H] float32, cstats [N, ROW_WIDTH] with the COS_* columns) from the row kernel's
    ``stats`` and ``tie``."""
    n, vocab = logits.shape
    temperature = options.temperature
    table = _float_table(embedding)
    valid = labels != options.ignore_index
    mu = torch.zeros(n, embedding.shape[1], device=logits.device, dtype=torch.float32)
    for start, end in _blocks(n, vocab):
        z, _ = _row_values(logits[start:end], options)
        w = _weights(z, stats[start:end], tie[start:end], temperature, valid[start:end])
        mu[start:end] = w @ table
    e = table.index_select(0, torch.where(valid, labels, 0))
    dot = (mu * e).sum(1)
    norm_mu = mu.norm(dim=1)
    norm_e = e.norm(dim=1)
    cos = dot / (norm_mu.clamp_min(EPS) * norm_e.clamp_min(EPS))
    cos = torch.where(torch.isnan(host_column(stats, STAT_LOG_SUM)), torch.full_like(cos, float("nan")), cos)
    cstats = torch.empty(n, ROW_WIDTH.value, device=logits.device, dtype=torch.float32)
    zero = torch.zeros((), device=logits.device)
    for name, values in ((COS_VALUE, cos), (COS_NORM_MU, norm_mu), (COS_NORM_E, norm_e), (COS_DOT, dot)):
        host_column(cstats, name).copy_(torch.where(valid, values, zero))
    return mu, cstats


def row_coefficients(cstats):
    """a, b and d per row, as _direction_coefficients in backward.py: g = a e + b mu,
    d cos / d e = a mu + d e."""
    cos, norm_mu, norm_e = (host_column(cstats, name) for name in (COS_VALUE, COS_NORM_MU, COS_NORM_E))
    nm_c, ne_c = norm_mu.clamp_min(EPS), norm_e.clamp_min(EPS)
    a = 1.0 / (nm_c * ne_c)
    zero = torch.zeros((), device=cstats.device)
    b = torch.where(norm_mu >= EPS, -cos / (nm_c * nm_c), zero)
    d = torch.where(norm_e >= EPS, -cos / (ne_c * ne_c), zero)
    return a, b, d


def dense_backward(logits, labels, embedding, saved, grad_ce, grad_cos, options, *, need_logits_grad, want_demb,
                   inplace=False, embedding_grad_out=None, grad_lse=None):
    """The dense path's backward -> (dlogits, dembedding); with ``embedding_grad_out`` (float32
    [V, H]) the embedding gradient is added to it unrounded and None is returned for it;
    ``grad_lse``: the coefficients of lse_n, or None."""
    temperature, ignore_index = options.temperature, options.ignore_index
    stats, tie, mu = saved.stats, saved.tie, saved.mu
    n, vocab = logits.shape
    device = logits.device
    table = _float_table(embedding)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    a, b, d = row_coefficients(saved.cstats)
    rows_used = valid & (grad_cos != 0)
    log_sum, z_max = host_column(stats, STAT_LOG_SUM)[:, None], host_column(stats, STAT_MAX)[:, None]
    dlogits = (logits if inplace else torch.empty_like(logits)) if need_logits_grad else None
    dtable = torch.zeros(vocab, embedding.shape[1], device=device, dtype=torch.float32) if want_demb else None
    for start, end in _blocks(n, vocab):
        rows = slice(start, end)
        z, slope = _row_values(logits[rows], options, with_slope=need_logits_grad)
        w = _weights(z, stats[rows], tie[rows], temperature, valid[rows])
        e = table.index_select(0, safe_labels[rows])
        # rows the cosine term does not reach contribute exactly nothing (their a, e may overflow)
        g = torch.where(rows_used[rows, None], a[rows, None] * e + b[rows, None] * mu[rows], 0.0)
        if need_logits_grad:
            s = g @ table.T
            # s_bar from the same rounded s it is subtracted from (backward.py's docstring)
            s_bar = (w * s).sum(1, keepdim=True)
            dz = _ce_gradient(z, z_max[rows], log_sum[rows], safe_labels[rows], grad_ce[rows],
                              None if grad_lse is None else grad_lse[rows], options.label_smoothing)
            dz = dz + (grad_cos[rows, None] / temperature) * w * (s - s_bar)
            if slope is not None:
                dz = dz * slope
            dlogits[rows] = torch.where(valid[rows, None], dz, torch.zeros((), device=device)).to(logits.dtype)
        if want_demb:
            # a NaN row poisons its own S only (as the sparse gather would), not every row of dE
            nan_rows = torch.isnan(g).any(1)
            dtable += (w * torch.where(valid[rows], grad_cos[rows], 0.0)[:, None]).T @ torch.where(
                nan_rows[:, None], torch.zeros((), device=device), g)
            if bool(nan_rows.any()):
                dtable[(w != 0).logical_or(torch.isnan(w))[nan_rows].any(0)] = float("nan")
    demb = None
    if want_demb:
        e = table.index_select(0, safe_labels)
        t = grad_cos[:, None] * (a[:, None] * mu + d[:, None] * e)
        if embedding_grad_out is not None:
            dtable += embedding_grad_out
        demb = add_target_terms(embedding, labels, rows_used, t, dtable, out=embedding_grad_out)
    return dlogits, (None if embedding_grad_out is not None else demb)


def add_target_terms(embedding, labels, rows_used, t, base, out=None):
    """base + the target entries' dE (rows of t summed per label, in row order), rounded once
    to E's dtype, or written to ``out`` (float32, may be ``base`` itself): the vocabulary pass
    with no S entries."""
    vocab, hidden = embedding.shape
    t_rows, t_offsets = grouping.target_segments(labels, rows_used, vocab)
    demb = torch.empty_like(embedding) if out is None else out
    chunk = min(next_pow2(hidden), CONFIG.max_hidden_chunk)
    for h0 in range(0, hidden, chunk):
        launch_vocabulary_pass(embedding, demb=demb, base=base, t_rows=t_rows, t_offsets=t_offsets, t=t[:, h0:],
                               chunk_stride=hidden, h0=h0, chunk=chunk)
    return demb
