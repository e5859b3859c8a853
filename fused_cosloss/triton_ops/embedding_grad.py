"""The vocabulary pass of the backward: s = E[v] . g_n for every (row n, v in S_n), and the
embedding gradient, deterministically, reading each embedding row once.

The gradient of ``sum_n grad_cos[n] * cos_n`` with respect to E has one entry per
(row n, v in S_n) and one per target y_n:

    dE[v]   += grad_cos[n] * w_{n,v} * g_n                  (through mu_n)
    dE[y_n] += grad_cos[n] * (a_n mu_n + d_n E[y_n])        (through e_n = E[y_n])

and the logits gradient needs s_{n,v} = E[v] . g_n for the same (n, v in S_n): the
transpose of the same sparse product. The host sorts the entries stably by
``2 * v + is_target`` (``torch.sort(stable=True)``) and finds each segment with
``searchsorted``; a program takes VB vocabulary rows side by side (VB = 1 on a GPU, more
under the interpreter), loads E[v] once, walks its S entries BE at a time (a [VB, BE, H]
tile of g rows from L2: the dot products s, and the weighted sum for dE), then its target
entries, and writes each dE[v] once. Each segment is summed in a fixed order with no
atomics: the same inputs give bitwise the same gradient, run after run.

Entry ids: ``n * K + j`` for slot j of S_n (an index into the saved [N, K] buffers),
``N * K + n`` for the target of row n.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def embedding_grad_kernel(
    demb_ptr, base_ptr, s_dot_ptr, perm_ptr, offsets_ptr, s_val_ptr, stats_ptr, coef_ptr, g_ptr, mu_ptr, emb_ptr,
    V, NK, K, H, temperature,
    WRITE_S: tl.constexpr, WRITE_DE: tl.constexpr, HAS_BASE: tl.constexpr,
    VB: tl.constexpr, BE: tl.constexpr, HP: tl.constexpr,
):
    v = tl.cast(tl.program_id(0), tl.int64) * VB + tl.arange(0, VB)
    v_in = v < V
    h = tl.arange(0, HP)
    h_in = h < H
    vh = v_in[:, None] & h_in[None, :]
    e_v = tl.load(emb_ptr + v[:, None] * H + h[None, :], mask=vh, other=0.0).to(tl.float32)
    s_start = tl.load(offsets_ptr + 2 * v, mask=v_in, other=0)
    t_start = tl.load(offsets_ptr + 2 * v + 1, mask=v_in, other=0)
    t_end = tl.load(offsets_ptr + 2 * v + 2, mask=v_in, other=0)
    acc = tl.zeros([VB, BE, HP], tl.float32)
    for j0 in range(0, tl.max(t_start - s_start, 0), BE):
        j = s_start[:, None] + j0 + tl.arange(0, BE)[None, :]
        j_in = j < t_start[:, None]
        entry = tl.load(perm_ptr + j, mask=j_in, other=0)
        row = entry // K
        tile = j_in[:, :, None] & h_in[None, None, :]
        g = tl.load(g_ptr + row[:, :, None] * H + h[None, None, :], mask=tile, other=0.0)
        if WRITE_S:
            tl.store(s_dot_ptr + entry, tl.sum(g * e_v[:, None, :], 2), mask=j_in)
        if WRITE_DE:
            g_cos = tl.load(coef_ptr + row * 4, mask=j_in, other=0.0)
            z_max = tl.load(stats_ptr + row * 4 + 1, mask=j_in, other=0.0)
            z_sum = tl.load(stats_ptr + row * 4 + 2, mask=j_in, other=1.0)
            z = tl.load(s_val_ptr + entry, mask=j_in, other=0.0).to(tl.float32)
            c = tl.where(j_in, g_cos * tl.exp(tl.div_rn(z - z_max, temperature)) / z_sum, 0.0)
            acc += c[:, :, None] * g
    if WRITE_DE:
        d_sum = tl.zeros([VB], tl.float32)
        for j0 in range(0, tl.max(t_end - t_start, 0), BE):
            j = t_start[:, None] + j0 + tl.arange(0, BE)[None, :]
            j_in = j < t_end[:, None]
            row = tl.load(perm_ptr + j, mask=j_in, other=NK) - NK
            coef_mu = tl.load(coef_ptr + row * 4 + 1, mask=j_in, other=0.0)
            coef_e = tl.load(coef_ptr + row * 4 + 2, mask=j_in, other=0.0)
            mu = tl.load(mu_ptr + row[:, :, None] * H + h[None, None, :], mask=j_in[:, :, None] & h_in[None, None, :],
                         other=0.0)
            acc += coef_mu[:, :, None] * mu
            d_sum += tl.sum(coef_e, 1)
        out = tl.sum(acc, 1) + d_sum[:, None] * e_v
        if HAS_BASE:
            out += tl.load(base_ptr + v[:, None] * H + h[None, :], mask=vh, other=0.0)
        tl.store(demb_ptr + v[:, None] * H + h[None, :], out.to(demb_ptr.dtype.element_ty), mask=vh)
