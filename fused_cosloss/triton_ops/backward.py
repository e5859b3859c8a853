"""Backward kernels over the rows: the cosine directions one chunk of H at a time, the
logits gradient outside S, and the logits gradient on S.

For a valid row n with upstream coefficients ``grad_ce[n]`` and ``grad_cos[n]``:

    dz_v = grad_ce[n] * (exp(z_v - max - log_sum) - [v == y])          every v
         + grad_cos[n] / T * w_v * (s_v - s_bar)                       v in S only
    s_v = E[v] . g,  g = a * e + b * mu,  s_bar = sum_S w_j s_j

(``log_sum`` = log sum_v exp(z_v - max), saved by the forward: nothing is relative to a
rounded lse). Analytically s_bar = mu . g = 0, but it is summed from the same rounded s_j
that s_v - s_bar subtracts it from, so that at a dominant entry (w_v near 1) the rounding
of s_v cancels, as in autograd's softmax backward; the closed form a (mu . e) + b |mu|^2
from the saved scalars does not cancel it and is 1 / T times less exact.

with ``a = 1 / (max(|mu|, eps) max(|e|, eps))`` and ``b = -cos / |mu|^2`` (0 when |mu| < eps:
the clamp has no gradient there), i.e. g = d cos / d mu of docs/spec.md, and likewise
d cos / d e = a * mu + d * e with ``d = -cos / |e|^2``.

``backward_rows_kernel`` (``write_outside_s``; the forward's row kernel calls it too, when it
computes the gradient itself) writes dz_v for every v outside S (membership is the elementwise
test ``z > t or (z == t and v <= tie_cut)`` saved by the forward), and for the whole row
where the cosine term adds nothing (ignored rows, rows with NaN, ``grad_cos[n] == 0``).
Each element is read and written by the same thread, and this is the backward's only read
of the logits (the rest uses S's values saved by the forward), so the gradient may be
written over the logits (``inplace``). The entries of S are left for the vocabulary pass
(embedding_grad.py), which writes their gradient.

``direction_chunk_kernel`` recomputes mu for the columns [h0, h0 + C) of H (the forward
does not keep it) and writes that chunk of g and of ``grad_cos * d cos / d e`` ([N, C]
float32 each) for the vocabulary pass, which sums s_v over the chunks.

``selected_grad_kernel`` then takes S's [N, K] saved values and the s_v the vocabulary pass
summed, forms s_bar per row and writes the logits gradient of S's entries.

Each kernel's launcher is below the kernels; ``cosine_backward`` runs the cosine term's
share of the sparse path's backward: the grouping (grouping.py), per chunk of H the
direction chunk and the vocabulary pass, then the selected gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouping, tiles
from .config import CONFIG
from .embedding_grad import launch_vocabulary_pass
from .gather import expected_embedding, load_index, selection_weight
from .layout import COS_NORM_E, COS_NORM_MU, COS_VALUE, STAT_LOG_SUM, STAT_MAX, STAT_S_SUM, STAT_THRESHOLD, column
from .transform import chain, smoothing_args, transform_args, transformed, transformed_with_slope

EPS = tl.constexpr(1e-12)


@triton.jit
def _direction_coefficients(cstats_ptr, rows64, valid):
    """Per row: a, b and d (see the module docstring) from the saved cos, |mu| and |e|."""
    cos = tl.load(column(cstats_ptr, rows64, COS_VALUE), mask=valid, other=0.0)
    norm_mu = tl.load(column(cstats_ptr, rows64, COS_NORM_MU), mask=valid, other=0.0)
    norm_e = tl.load(column(cstats_ptr, rows64, COS_NORM_E), mask=valid, other=0.0)
    nm_c = tl.maximum(norm_mu, EPS)
    ne_c = tl.maximum(norm_e, EPS)
    a = 1.0 / (nm_c * ne_c)
    b = tl.where(norm_mu >= EPS, -cos / (nm_c * nm_c), 0.0)  # nm_c == |mu| wherever it applies
    d = tl.where(norm_e >= EPS, -cos / (ne_c * ne_c), 0.0)
    return a, b, d


@triton.jit
def direction_chunk_kernel(
    emb_ptr, labels_ptr, s_idx_ptr, s_val_ptr, stats_ptr, cstats_ptr, grad_cos_ptr, g_ptr, t_ptr,
    N, K, H, h0, C, ignore_index, temperature, scale, inv_cap, cap,
    WRITE_T: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    """Columns [h0, h0 + C) of g = a e + b mu (``g_ptr``) and of grad_cos * (a mu + d e)
    (``t_ptr``, with WRITE_T), [N, C] float32, for the rows the cosine term reaches
    (valid, grad_cos != 0); mu from S's saved indices and values."""
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    g_cos = tl.load(grad_cos_ptr + rows64, mask=valid, other=0.0)
    a, b, d = _direction_coefficients(cstats_ptr, rows64, valid)
    used = valid & (g_cos != 0.0)
    if tl.max(used.to(tl.int32), 0) > 0:
        z_max = tl.load(column(stats_ptr, rows64, STAT_MAX), mask=used, other=0.0)
        z_sum = tl.load(column(stats_ptr, rows64, STAT_S_SUM), mask=used, other=1.0)
        e_rows = emb_ptr + tl.where(used, y, 0) * H
        for c0 in range(0, C, BH):
            j = c0 + tl.arange(0, BH)
            h = h0 + j
            h_in = (j < C) & (h < H)
            mu = expected_embedding(emb_ptr, s_idx_ptr, s_val_ptr, rows64, used, z_max, z_sum, K, H, h, h_in,
                                    temperature, scale, inv_cap, cap, SCALE, CAP, BR=BR, BK=BK, BH=BH)
            both = used[:, None] & h_in[None, :]
            e = tl.load(e_rows[:, None] + h[None, :], mask=both, other=0.0).to(tl.float32)
            at = rows64[:, None] * C + j[None, :]
            tl.store(g_ptr + at, a[:, None] * e + b[:, None] * mu, mask=both)
            if WRITE_T:
                tl.store(t_ptr + at, g_cos[:, None] * (a[:, None] * mu + d[:, None] * e), mask=both)


@triton.jit
def cosine_rows(grad_cos_ptr, rows64, valid, log_sum):
    """The rows whose S's gradient selected_grad_kernel writes: valid, without NaN (such a row
    is written whole, NaN, by write_outside_s) and with a cosine weight."""
    g_cos = tl.load(grad_cos_ptr + rows64, mask=valid, other=0.0)
    return valid & (log_sum == log_sum) & (g_cos != 0.0)


@triton.jit
def ce_gradient(p, is_label, g_ce, g_lse, smoothing, V, LSE: tl.constexpr, SMOOTH: tl.constexpr):
    """d/dz' of g_ce ce + g_lse lse at entries of softmax p (``is_label``: v == y): g_ce (p - [v == y])
    without the options; (g_ce + g_lse) p - g_ce ((1 - smoothing) [v == y] + smoothing / V) with them."""
    target = tl.where(is_label, 1.0, 0.0)
    if SMOOTH:
        target = tl.where(is_label, 1.0 - smoothing, 0.0) + smoothing / V
    if LSE:
        return (g_ce + g_lse) * p - g_ce * target
    else:
        return g_ce * (p - target)


@triton.jit
def write_outside_s(in_rows, out_rows, y, row_in, valid, g_ce, g_lse, z_max, log_sum, exclude, t_val, tie_cut, V,
                    smoothing, scale, inv_cap, cap, LSE: tl.constexpr, SMOOTH: tl.constexpr, SCALE: tl.constexpr,
                    CAP: tl.constexpr, BV: tl.constexpr):
    """dz_v = g_ce (p_v - [v == y]) for every v of the rows (``in_rows`` / ``out_rows``: [BR] row pointers)
    except, in the rows ``exclude`` marks, the members of S (``z' > t_val or (z' == t_val and v <= tie_cut)``),
    with p_v = exp(z'_v - max - log_sum); with the options: + g_lse p_v (LSE), the target
    (1 - smoothing) [v == y] + smoothing / V (SMOOTH), and times dz'/dz (SCALE, CAP). Ignored rows get zeros."""
    lanes = tl.arange(0, BV)
    for start in range(0, V, BV):
        offs = start + lanes
        inside = (offs < V)[None, :]
        z = tl.load(in_rows[:, None] + offs[None, :], mask=valid[:, None] & inside, other=0.0).to(tl.float32)
        slope = z
        if SCALE or CAP:
            z, slope = transformed_with_slope(z, scale, inv_cap, cap, SCALE, CAP)
        tie_taken = (z == t_val[:, None]) & (offs[None, :] <= tie_cut[:, None])
        member = exclude[:, None] & ((z > t_val[:, None]) | tie_taken)
        p = tl.exp((z - z_max[:, None]) - log_sum[:, None])
        dz = ce_gradient(p, offs[None, :] == y[:, None], g_ce[:, None], g_lse[:, None], smoothing, V, LSE, SMOOTH)
        dz = chain(dz, slope, SCALE, CAP)
        tl.store(out_rows[:, None] + offs[None, :], dz.to(out_rows.dtype.element_ty),
                 mask=row_in[:, None] & inside & ~member)


@triton.jit
def backward_rows_kernel(
    logits_ptr, stride_row, labels_ptr, grad_ce_ptr, grad_cos_ptr, grad_lse_ptr, stats_ptr, tie_ptr, dlogits_ptr,
    out_stride, N, V, ignore_index, smoothing, scale, inv_cap, cap,
    WITH_COS: tl.constexpr, SMOOTH: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr,
    BR: tl.constexpr, BV: tl.constexpr,
):
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    g_ce = tl.load(grad_ce_ptr + rows64, mask=valid, other=0.0)  # ignored rows: zero gradient
    g_lse = g_ce
    if grad_lse_ptr is not None:
        g_lse = tl.load(grad_lse_ptr + rows64, mask=valid, other=0.0)
    log_sum = tl.load(column(stats_ptr, rows64, STAT_LOG_SUM), mask=valid, other=0.0)
    z_max = tl.load(column(stats_ptr, rows64, STAT_MAX), mask=valid, other=0.0)
    t_val = tl.zeros([BR], tl.float32)
    tie_cut = tl.zeros([BR], tl.int32) - 1
    exclude = tl.zeros([BR], tl.int1)
    if WITH_COS:
        exclude = cosine_rows(grad_cos_ptr, rows64, valid, log_sum)
        t_val = tl.load(column(stats_ptr, rows64, STAT_THRESHOLD), mask=exclude, other=0.0)
        tie_cut = tl.load(tie_ptr + rows64, mask=exclude, other=-1)
    write_outside_s(logits_ptr + rows64 * stride_row, dlogits_ptr + rows64 * out_stride, y, row_in, valid, g_ce,
                    g_lse, z_max, log_sum, exclude, t_val, tie_cut, V, smoothing, scale, inv_cap, cap,
                    grad_lse_ptr is not None, SMOOTH, SCALE, CAP, BV)


@triton.jit
def selected_grad_kernel(
    labels_ptr, s_idx_ptr, s_val_ptr, s_dot_ptr, stats_ptr, grad_ce_ptr, grad_cos_ptr, grad_lse_ptr, dlogits_ptr,
    out_stride, N, K, V, ignore_index, temperature, smoothing, scale, inv_cap, cap,
    SMOOTH: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """The logits gradient of S's entries (``cosine_rows`` only; write_outside_s wrote the rest):
    s_bar = sum_j w_j s_j from the s_j the vocabulary pass summed (``s_dot``, [N, K] float32 in
    S's order), then dz of each entry, at its vocabulary index. The entries' logits come from
    S's saved values, so the logits may already hold their gradient (``inplace``)."""
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    log_sum = tl.load(column(stats_ptr, rows64, STAT_LOG_SUM), mask=valid, other=0.0)
    used = cosine_rows(grad_cos_ptr, rows64, valid, log_sum)
    if tl.max(used.to(tl.int32), 0) > 0:
        z_max = tl.load(column(stats_ptr, rows64, STAT_MAX), mask=used, other=0.0)
        z_sum = tl.load(column(stats_ptr, rows64, STAT_S_SUM), mask=used, other=1.0)
        g_ce = tl.load(grad_ce_ptr + rows64, mask=used, other=0.0)
        g_cos = tl.load(grad_cos_ptr + rows64, mask=used, other=0.0)
        g_lse = g_ce
        if grad_lse_ptr is not None:
            g_lse = tl.load(grad_lse_ptr + rows64, mask=used, other=0.0)
        s_bar_vec = tl.zeros([BR, BK], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            in_s = used[:, None] & (k < K)[None, :]
            at = rows64[:, None] * K + k[None, :]
            z = tl.load(s_val_ptr + at, mask=in_s, other=0.0).to(tl.float32)
            if SCALE or CAP:
                z = transformed(z, scale, inv_cap, cap, SCALE, CAP)
            w = tl.where(in_s, selection_weight(z, z_max[:, None], z_sum[:, None], temperature), 0.0)
            s_bar_vec += w * tl.load(s_dot_ptr + at, mask=in_s, other=0.0)
        s_bar = tl.sum(s_bar_vec, 1)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            in_s = used[:, None] & (k < K)[None, :]
            at = rows64[:, None] * K + k[None, :]
            v = load_index(s_idx_ptr + at, in_s)
            z = tl.load(s_val_ptr + at, mask=in_s, other=0.0).to(tl.float32)
            slope = z
            if SCALE or CAP:
                z, slope = transformed_with_slope(z, scale, inv_cap, cap, SCALE, CAP)
            w = selection_weight(z, z_max[:, None], z_sum[:, None], temperature)
            s = tl.load(s_dot_ptr + at, mask=in_s, other=0.0)
            p = tl.exp((z - z_max[:, None]) - log_sum[:, None])
            dz = ce_gradient(p, v == y[:, None], g_ce[:, None], g_lse[:, None], smoothing, V,
                             grad_lse_ptr is not None, SMOOTH)
            dz += g_cos[:, None] / temperature * w * (s - s_bar[:, None])
            dz = chain(dz, slope, SCALE, CAP)
            tl.store(dlogits_ptr + rows64[:, None] * out_stride + v, dz.to(dlogits_ptr.dtype.element_ty), mask=in_s)


def launch_backward_rows(logits, labels, *, grad_ce, grad_cos, stats, tie, dlogits, options, grad_lse=None):
    """backward_rows_kernel over every row: the logits gradient outside S (every entry of the rows
    the cosine term does not reach) into ``dlogits``, which may be the logits; ``grad_lse``: the
    coefficients of lse_n, or None."""
    n, vocab = logits.shape
    rows = tiles.rows_per_step(n)
    backward_rows_kernel[(triton.cdiv(n, rows),)](
        # inputs
        logits_ptr=logits, stride_row=logits.stride(0), labels_ptr=labels, grad_ce_ptr=grad_ce, grad_cos_ptr=grad_cos,
        grad_lse_ptr=grad_lse, stats_ptr=stats, tie_ptr=tie,
        # output
        dlogits_ptr=dlogits, out_stride=dlogits.stride(0),
        # shapes and options
        N=n, V=vocab, ignore_index=options.ignore_index, **transform_args(options), **smoothing_args(options),
        # constexprs
        WITH_COS=options.with_cos, BR=rows, BV=tiles.row_block(vocab), num_warps=CONFIG.backward_warps,
    )


def launch_direction_chunk(embedding, labels, saved, grad_cos, *, g, t=None, h0, chunk, options):
    """direction_chunk_kernel: columns [h0, h0 + chunk) of g into ``g`` and, when ``t`` is given, of
    grad_cos * d cos / d e into ``t`` (``[N, chunk]`` float32 each)."""
    n, hidden = labels.shape[0], embedding.shape[1]
    tile = tiles.gather_tiles(n, options.k, hidden)
    direction_chunk_kernel[(triton.cdiv(n, tile["BR"]),)](
        # inputs
        emb_ptr=embedding, labels_ptr=labels, s_idx_ptr=saved.s_idx, s_val_ptr=saved.s_val, stats_ptr=saved.stats,
        cstats_ptr=saved.cstats, grad_cos_ptr=grad_cos,
        # outputs
        g_ptr=g, t_ptr=t,
        # shapes and options
        N=n, K=options.k, H=hidden, h0=h0, C=chunk, ignore_index=options.ignore_index,
        temperature=float(options.temperature), **transform_args(options),
        # constexprs
        WRITE_T=t is not None, BR=tile["BR"], BK=tile["BK"], BH=min(tile["BH"], tiles.next_pow2(chunk)),
        num_warps=CONFIG.cosine_warps,
    )


def launch_selected_grad(labels, saved, *, s_dot, grad_ce, grad_cos, dlogits, options, grad_lse=None):
    """selected_grad_kernel: the logits gradient of S's entries into ``dlogits``."""
    n, vocab = dlogits.shape
    rows = tiles.rows_per_step(n)
    selected_grad_kernel[(triton.cdiv(n, rows),)](
        # inputs
        labels_ptr=labels, s_idx_ptr=saved.s_idx, s_val_ptr=saved.s_val, s_dot_ptr=s_dot, stats_ptr=saved.stats,
        grad_ce_ptr=grad_ce, grad_cos_ptr=grad_cos, grad_lse_ptr=grad_lse,
        # output
        dlogits_ptr=dlogits, out_stride=dlogits.stride(0),
        # shapes and options
        N=n, K=options.k, V=vocab, ignore_index=options.ignore_index, temperature=float(options.temperature),
        **transform_args(options), **smoothing_args(options),
        # constexprs
        BR=rows, BK=tiles.selected_block(options.k), num_warps=CONFIG.cosine_warps,
    )


def cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, options, *, dlogits=None, want_demb,
                    embedding_grad_out=None, grad_lse=None):
    """The cosine term's share of the sparse path's backward: dE (added to ``embedding_grad_out``
    when given, and None returned), and the logits gradient on S when ``dlogits`` is given (whose
    entries outside S launch_backward_rows or the forward's row kernel already wrote; ``grad_lse``:
    the coefficients of lse_n, or None). Per chunk of H: the directions, then the vocabulary pass;
    then the logits gradient on S."""
    n, vocab = logits.shape
    k = options.k
    hidden = embedding.shape[1]
    device = logits.device
    rows_used = (labels != options.ignore_index) & (grad_cos != 0)
    entries, offsets, pieces, piece_len = grouping.grouped_entries(saved.s_idx, rows_used, vocab)
    t_rows, t_offsets = grouping.target_segments(labels, rows_used, vocab) if want_demb else (None, None)
    chunk = tiles.hidden_chunk(vocab, hidden, logits.element_size())
    g = torch.empty(n, chunk, device=device, dtype=torch.float32)
    t = torch.empty(n, chunk, device=device, dtype=torch.float32) if want_demb else None
    # s = E[v] . g of S's entries, summed over the chunks, in S's [N, k] order
    s_dot = torch.empty(n, k, device=device, dtype=torch.float32) if dlogits is not None else None
    demb = None
    if want_demb:
        demb = embedding_grad_out if embedding_grad_out is not None else torch.empty_like(embedding)
    for index, h0 in enumerate(range(0, hidden, chunk)):
        launch_direction_chunk(embedding, labels, saved, grad_cos, g=g, t=t, h0=h0, chunk=chunk, options=options)
        launch_vocabulary_pass(embedding, demb=demb, base=embedding_grad_out, s_val=saved.s_val, entries=entries,
                               offsets=offsets, pieces=pieces, piece_len=piece_len, k=k, s_dot=s_dot,
                               t_rows=t_rows, t_offsets=t_offsets, g=g, t=t, chunk_stride=chunk, stats=saved.stats,
                               grad_cos=grad_cos, h0=h0, chunk=chunk, temperature=options.temperature,
                               first=index == 0, transform=transform_args(options))
    del g, t
    if dlogits is not None:
        launch_selected_grad(labels, saved, s_dot=s_dot, grad_ce=grad_ce, grad_cos=grad_cos, dlogits=dlogits,
                             options=options, grad_lse=grad_lse)
    return None if embedding_grad_out is not None else demb
