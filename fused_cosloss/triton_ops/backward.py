"""Backward kernels over the rows: the cosine direction g, then the logits gradient.

For a valid row n with upstream coefficients ``grad_ce[n]`` and ``grad_cos[n]``:

    dz_v = grad_ce[n] * (exp(z_v - lse) - [v == y])                    every v
         + grad_cos[n] / T * w_v * (s_v - s_bar)                       v in S only
    s_v = E[v] . g,  g = a * e + b * mu,  s_bar = sum_S w_j s_j = mu . g = a * (mu . e) + b * |mu|^2

with ``a = 1 / (max(|mu|, eps) max(|e|, eps))`` and ``b = -cos / |mu|^2`` (0 when |mu| < eps:
the clamp has no gradient there), i.e. g = d cos / d mu of the SPEC, and likewise
d cos / d e = a * mu + d * e with ``d = -cos / |e|^2``.

``direction_kernel`` writes g ([N, H] float32) and the per-row coefficients the vocabulary
pass needs; the vocabulary pass (embedding_grad.py) computes every s_v = E[v] . g_n reading
each embedding row once; ``backward_rows_kernel`` then writes the logits gradient: the K
entries of S by the sparse loop (dense and cosine parts together, one rounding), every
other entry by the dense loop. Membership is the elementwise test
``z > t or (z == t and v <= tie_cut)`` saved by the forward, so each element is written
exactly once and the row is read once (plus K gathered values). The dense loop runs first
and the sparse loop takes S's values from the saved ``s_val``, so the gradient can be
written over the logits themselves (``inplace``).
"""
from __future__ import annotations

import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)


@triton.jit
def _direction_coefficients(cstats_ptr, rows64, valid):
    """Per row: cos, a, b, d (see the module docstring) from the saved cos, |mu|, |e|, mu . e."""
    cos = tl.load(cstats_ptr + rows64 * 4 + 0, mask=valid, other=0.0)
    norm_mu = tl.load(cstats_ptr + rows64 * 4 + 1, mask=valid, other=0.0)
    norm_e = tl.load(cstats_ptr + rows64 * 4 + 2, mask=valid, other=0.0)
    dot = tl.load(cstats_ptr + rows64 * 4 + 3, mask=valid, other=0.0)
    nm_c = tl.maximum(norm_mu, EPS)
    ne_c = tl.maximum(norm_e, EPS)
    a = 1.0 / (nm_c * ne_c)
    b = tl.where(norm_mu >= EPS, -cos / (nm_c * nm_c), 0.0)  # nm_c == |mu| wherever it applies
    d = tl.where(norm_e >= EPS, -cos / (ne_c * ne_c), 0.0)
    s_bar = a * dot + b * norm_mu * norm_mu
    return a, b, d, s_bar


@triton.jit
def direction_kernel(
    emb_ptr, labels_ptr, mu_ptr, cstats_ptr, grad_cos_ptr, g_ptr, coef_ptr,
    N, H, ignore_index,
    BR: tl.constexpr, BH: tl.constexpr,
):
    """g = a e + b mu per valid row ([N, H] float32), and coef = (grad_cos, grad_cos * a, grad_cos * d)."""
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    g_cos = tl.load(grad_cos_ptr + rows64, mask=valid, other=0.0)
    a, b, d, s_bar = _direction_coefficients(cstats_ptr, rows64, valid)
    tl.store(coef_ptr + rows64 * 4 + 0, g_cos, mask=row_in)
    tl.store(coef_ptr + rows64 * 4 + 1, tl.where(valid, g_cos * a, 0.0), mask=row_in)
    tl.store(coef_ptr + rows64 * 4 + 2, tl.where(valid, g_cos * d, 0.0), mask=row_in)
    tl.store(coef_ptr + rows64 * 4 + 3, s_bar, mask=row_in)
    if tl.max(valid.to(tl.int32), 0) > 0:
        e_rows = emb_ptr + tl.where(valid, y, 0) * H
        for h0 in range(0, H, BH):
            h = h0 + tl.arange(0, BH)
            both = valid[:, None] & (h < H)[None, :]
            e = tl.load(e_rows[:, None] + h[None, :], mask=both, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + rows64[:, None] * H + h[None, :], mask=both, other=0.0)
            tl.store(g_ptr + rows64[:, None] * H + h[None, :], a[:, None] * e + b[:, None] * mu, mask=both)


@triton.jit
def backward_rows_kernel(
    logits_ptr, stride_row, labels_ptr, grad_ce_ptr, grad_cos_ptr,
    stats_ptr, tie_ptr, s_idx_ptr, s_val_ptr, s_dot_ptr, coef_ptr, dlogits_ptr, out_stride,
    N, V, K, ignore_index, temperature,
    WITH_COS: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    DT: tl.constexpr = dlogits_ptr.dtype.element_ty
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    in_rows = logits_ptr + rows64 * stride_row
    out_rows = dlogits_ptr + rows64 * out_stride
    g_ce = tl.load(grad_ce_ptr + rows64, mask=valid, other=0.0)  # ignored rows: zero gradient
    lse = tl.load(stats_ptr + rows64 * 4 + 0, mask=valid, other=0.0)
    exclude = tl.zeros([BR], tl.int1)
    t_val = tl.zeros([BR], tl.float32)
    tie_cut = tl.zeros([BR], tl.int32) - 1
    active = tl.zeros([BR], tl.int1)
    if WITH_COS:
        active = valid & (lse == lse)  # a row with NaN is written whole by the dense loop (NaN)
        t_val = tl.load(stats_ptr + rows64 * 4 + 3, mask=active, other=0.0)
        tie_cut = tl.load(tie_ptr + rows64, mask=active, other=-1)
        exclude = active
    # The dense loop first, the K entries of S after it: the gradient may be written over the
    # logits themselves (in place), and only the dense loop reads them (the sparse loop takes
    # S's values from s_val).
    lanes = tl.arange(0, BV)
    for start in range(0, V, BV):
        offs = start + lanes
        inside = (offs < V)[None, :]
        z = tl.load(in_rows[:, None] + offs[None, :], mask=valid[:, None] & inside, other=0.0).to(tl.float32)
        tie_taken = (z == t_val[:, None]) & (offs[None, :] <= tie_cut[:, None])
        member = exclude[:, None] & ((z > t_val[:, None]) | tie_taken)
        dz = g_ce[:, None] * (tl.exp(z - lse[:, None]) - tl.where(offs[None, :] == y[:, None], 1.0, 0.0))
        tl.store(out_rows[:, None] + offs[None, :], dz.to(DT), mask=row_in[:, None] & inside & ~member)
    if WITH_COS:
        # every thread of the program has read the row before any S entry is written over it
        tl.debug_barrier()
        if tl.max(active.to(tl.int32), 0) > 0:
            g_cos = tl.load(grad_cos_ptr + rows64, mask=active, other=0.0)
            s_bar = tl.load(coef_ptr + rows64 * 4 + 3, mask=active, other=0.0)
            z_max = tl.load(stats_ptr + rows64 * 4 + 1, mask=active, other=0.0)
            z_sum = tl.load(stats_ptr + rows64 * 4 + 2, mask=active, other=1.0)
            scale = g_cos / temperature
            with_s = active & (g_cos != 0.0)  # rows whose s the vocabulary pass computed
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                in_s = active[:, None] & (k < K)[None, :]
                at = rows64[:, None] * K + k[None, :]
                vocab = tl.load(s_idx_ptr + at, mask=in_s, other=0)
                z = tl.load(s_val_ptr + at, mask=in_s, other=0.0).to(tl.float32)
                s = tl.load(s_dot_ptr + at, mask=in_s & with_s[:, None], other=0.0)
                w = tl.exp(tl.div_rn(z - z_max[:, None], temperature)) / z_sum[:, None]
                dz = g_ce[:, None] * (tl.exp(z - lse[:, None]) - tl.where(vocab == y[:, None], 1.0, 0.0))
                dz += tl.where(with_s[:, None], scale[:, None] * w * (s - s_bar[:, None]), 0.0)
                tl.store(out_rows[:, None] + vocab, dz.to(DT), mask=in_s)
