"""The expected embedding over S for a chunk of hidden columns, shared by the forward
(``cosine_kernel``) and the backward (``direction_chunk_kernel``, which recomputes mu one
chunk of H at a time instead of keeping it from the forward); and the reading of S's
indices, stored as int16 for vocabularies up to 65536.

    mu[n, h] = sum_{j < K} w_{n,j} E[S_{n,j}, h],   w_{n,j} = exp((z_{n,j} - z_max_n) / T) / Z_n

over a block of BR rows and BH columns: [BR, BK, BH] tiles of gathered embedding rows,
accumulated in float32 and reduced over K once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .transform import transformed


@triton.jit
def load_index(ptrs, mask):
    """Vocabulary indices of S as int32: int16 storage holds indices up to 65535, read unsigned."""
    index = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    return tl.where(index < 0, index + 65536, index)


@triton.jit
def selection_weight(z, z_max, z_sum, temperature):
    """w = exp((z - z_max) / T) / Z, the softmax weight of an entry of S (float32). Every kernel
    that needs w computes it here, so that all of them round it alike: the backward's
    s_bar = sum w s cancels the rounding of s only if its w are the forward's."""
    return tl.exp(tl.div_rn(z - z_max, temperature)) / z_sum


@triton.jit
def expected_embedding(
    emb_ptr, s_idx_ptr, s_val_ptr, rows64, valid, z_max, z_sum, K, H, h, h_in, temperature,
    scale, inv_cap, cap, SCALE: tl.constexpr, CAP: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    """[BR, BH] float32: mu of the rows ``rows64`` (zero where not ``valid``) at columns ``h``,
    from S's indices and values (``[N, K]`` each: the logits, turned into z' here)."""
    acc = tl.zeros([BR, BK, BH], tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        in_s = valid[:, None] & (k < K)[None, :]
        at = rows64[:, None] * K + k[None, :]
        vocab = load_index(s_idx_ptr + at, in_s)
        z = tl.load(s_val_ptr + at, mask=in_s, other=0.0).to(tl.float32)
        if SCALE or CAP:
            z = transformed(z, scale, inv_cap, cap, SCALE, CAP)
        w = tl.where(in_s, selection_weight(z, z_max[:, None], z_sum[:, None], temperature), 0.0)
        gathered = tl.load(emb_ptr + tl.cast(vocab, tl.int64)[:, :, None] * H + h[None, None, :],
                           mask=in_s[:, :, None] & h_in[None, None, :], other=0.0)
        acc += w[:, :, None] * gathered.to(tl.float32)
    return tl.sum(acc, 1)
