"""The vocabulary pass of the backward, one chunk of H columns at a time: the embedding
gradient, and the dot products s of S's entries that the logits gradient on S needs,
deterministically, reading each embedding row once.

The gradient of ``sum_n grad_cos[n] * cos_n`` with respect to E has one entry per
(row n, v in S_n) and one per target y_n:

    dE[v]   += grad_cos[n] * w_{n,v} * g_n                  (through mu_n)
    dE[y_n] += grad_cos[n] * (a_n mu_n + d_n E[y_n])        (through e_n = E[y_n]: ``t_n``)

and the logits gradient on S needs s_{n,v} = E[v] . g_n for the same (n, v in S_n): the
transpose of the same sparse product. The host groups the entries by v (``entries``:
positions n * K + j in the saved [N, K] indices and values of S, in pieces of consecutive
rows, each piece sorted by (v, n) with its own offsets [PIECES, V + 1]) and the targets by
label (``t_rows``, ``t_offsets``). A program takes VB vocabulary rows side by side (VB = 1
on a GPU, more under the interpreter), loads the chunk of E[v] once, and walks its entries
BE at a time, piece after piece: the chunk's part of s, added to the earlier chunks' in
``s_ptr`` ([N, K] float32 in S's order: each entry is owned by the program of its v), and
the weighted sum for dE. Then its target entries, and it writes each dE[v] chunk once.
selected_grad_kernel (backward.py) turns the summed s into the logits gradient of S. Every
sum is taken in a fixed order with no atomics: the same inputs give bitwise the same
gradients, run after run.

g and t are [N, C] float32 chunks (``chunk_stride`` apart) written by direction_chunk_kernel.
The dense path (dense.py) launches the pass for the target entries alone: no entries of S
(``entries_ptr`` and the pointers only they use are None), its dE added to a float32 base.
``launch_vocabulary_pass`` follows the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import tiles
from .gather import selection_weight
from .layout import STAT_MAX, STAT_S_SUM, column
from .transform import transformed


@triton.jit
def embedding_grad_kernel(
    demb_ptr, base_ptr, emb_ptr, s_val_ptr,
    entries_ptr, offsets_ptr, s_ptr, PIECES, PIECE_LEN, K,
    t_rows_ptr, t_offsets_ptr,
    g_ptr, t_ptr, chunk_stride, stats_ptr, grad_cos_ptr,
    V, H, h0, C, temperature, scale, inv_cap, cap,
    FIRST: tl.constexpr, WRITE_S: tl.constexpr, WRITE_DE: tl.constexpr,
    HAS_BASE: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr,
    VB: tl.constexpr, BE: tl.constexpr, BC: tl.constexpr,
):
    v = tl.cast(tl.program_id(0), tl.int64) * VB + tl.arange(0, VB)
    v_in = v < V
    j = tl.arange(0, BC)
    h = h0 + j
    h_in = (j < C) & (h < H)
    vh = v_in[:, None] & h_in[None, :]
    e_v = tl.load(emb_ptr + v[:, None] * H + h[None, :], mask=vh, other=0.0).to(tl.float32)
    acc = tl.zeros([VB, BE, BC], tl.float32)
    if entries_ptr is not None:  # None: the target entries alone (the dense path's dE)
        for piece in range(0, PIECES):
            starts = offsets_ptr + tl.cast(piece, tl.int64) * (V + 1) + v
            start = tl.load(starts, mask=v_in, other=0)
            end = tl.load(starts + 1, mask=v_in, other=0)
            piece_base = tl.cast(piece, tl.int64) * PIECE_LEN
            for i0 in range(0, tl.max(end - start, 0), BE):
                i = start[:, None] + i0 + tl.arange(0, BE)[None, :]
                i_in = i < end[:, None]
                pos = piece_base + i
                slot = tl.load(entries_ptr + pos, mask=i_in, other=0).to(tl.int64)
                row = slot // K
                g = tl.load(g_ptr + row[:, :, None] * chunk_stride + j[None, None, :],
                            mask=i_in[:, :, None] & h_in[None, None, :], other=0.0)
                if WRITE_DE:
                    g_cos = tl.load(grad_cos_ptr + row, mask=i_in, other=0.0)
                    z_max = tl.load(column(stats_ptr, row, STAT_MAX), mask=i_in, other=0.0)
                    z_sum = tl.load(column(stats_ptr, row, STAT_S_SUM), mask=i_in, other=1.0)
                    z = tl.load(s_val_ptr + slot, mask=i_in, other=0.0).to(tl.float32)
                    if SCALE or CAP:  # S's values are the logits: w is of z'
                        z = transformed(z, scale, inv_cap, cap, SCALE, CAP)
                    w = selection_weight(z, z_max, z_sum, temperature)
                    acc += tl.where(i_in, g_cos * w, 0.0)[:, :, None] * g
                if WRITE_S:
                    s = tl.sum(g * e_v[:, None, :], 2)
                    if not FIRST:
                        s += tl.load(s_ptr + slot, mask=i_in, other=0.0)
                    tl.store(s_ptr + slot, s, mask=i_in)
    if WRITE_DE:
        t_start = tl.load(t_offsets_ptr + v, mask=v_in, other=0)
        t_end = tl.load(t_offsets_ptr + v + 1, mask=v_in, other=0)
        for i0 in range(0, tl.max(t_end - t_start, 0), BE):
            i = t_start[:, None] + i0 + tl.arange(0, BE)[None, :]
            i_in = i < t_end[:, None]
            row = tl.load(t_rows_ptr + i, mask=i_in, other=0).to(tl.int64)
            acc += tl.load(t_ptr + row[:, :, None] * chunk_stride + j[None, None, :],
                           mask=i_in[:, :, None] & h_in[None, None, :], other=0.0)
        out = tl.sum(acc, 1)
        if HAS_BASE:
            out += tl.load(base_ptr + v[:, None] * H + h[None, :], mask=vh, other=0.0)
        tl.store(demb_ptr + v[:, None] * H + h[None, :], out.to(demb_ptr.dtype.element_ty), mask=vh)


def launch_vocabulary_pass(embedding, *, demb=None, base=None, s_val=None, entries=None, offsets=None, pieces=0,
                           piece_len=0, k=1, s_dot=None, t_rows=None, t_offsets=None, g=None, t, chunk_stride,
                           stats=None, grad_cos=None, h0, chunk, temperature=1.0, first=True, transform=None):
    """embedding_grad_kernel over the vocabulary, for the columns [h0, h0 + chunk) of H.

    S's entries (``entries`` / ``offsets`` from grouping.grouped_entries, with ``s_val``,
    ``stats``, ``grad_cos`` and the chunk ``g``; None: no entries of S) give s into ``s_dot``
    (summed over the chunks; ``first``: the first chunk) and their part of dE; the targets
    (``t_rows`` / ``t_offsets`` from grouping.target_segments, with the chunk ``t``) theirs.
    dE goes to ``demb`` (None: not wanted), added to ``base`` (float32) when given. ``transform``:
    the scale and cap arguments (``transform.transform_args``; None: neither)."""
    vocab, hidden = embedding.shape
    tile = tiles.vocab_tiles(chunk)
    embedding_grad_kernel[(triton.cdiv(vocab, tile["VB"]),)](
        # inputs
        emb_ptr=embedding, base_ptr=base, s_val_ptr=s_val, stats_ptr=stats, grad_cos_ptr=grad_cos,
        entries_ptr=entries, offsets_ptr=offsets, PIECES=pieces, PIECE_LEN=piece_len, K=k,
        t_rows_ptr=t_rows, t_offsets_ptr=t_offsets, g_ptr=g, t_ptr=t, chunk_stride=chunk_stride,
        # outputs
        demb_ptr=demb, s_ptr=s_dot,
        # shapes and options
        V=vocab, H=hidden, h0=h0, C=chunk, temperature=float(temperature),
        **(transform or dict(scale=1.0, inv_cap=1.0, cap=1.0, SCALE=False, CAP=False)),
        # constexprs
        FIRST=first, WRITE_S=s_dot is not None, WRITE_DE=demb is not None, HAS_BASE=base is not None,
        VB=tile["VB"], BE=tile["BE"], BC=tile["BC"], num_warps=tile["NW"], maxnreg=tile["MAXNREG"],
    )
