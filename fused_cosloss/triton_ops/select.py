"""Radix selection of the top K logits of a row, as ``@triton.jit`` helpers.

Every helper works on a block of BR rows at once (``[BR, W]`` tiles, per-row results of
shape ``[BR]``): BR is 1 on a GPU and larger under the interpreter, where the cost is per
operation, not per element.

Every value gets an order-preserving signed int32 *key* (``sort_key``): the float's bits
with the lower 31 bits flipped for negative numbers, so that integer order is float
order. Keys of 16-bit dtypes come from their own 16 bits shifted into the high half (the
low 16 bits are then zero, and two 8-bit radix passes resolve a key instead of four).
-0.0 gets the key of +0.0 (they compare equal as floats) and NaN a key above +inf, as
torch.topk ranks NaN (rows with a NaN are reported as NaN; the selection only has to
terminate and stay in bounds, which counting guarantees).

The K-th largest key is found by radix passes: a 256-bin ``tl.histogram`` of one 8-bit
digit of the keys that share the digits found so far, then the bin holding the K-th
largest. No sort anywhere; the selected set S is then compacted in index order with
``tl.cumsum`` (values equal to the K-th are taken lowest index first).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .transform import transformed

# The sign bit; XOR with it turns signed-order keys into unsigned-order bit patterns.
SIGN = tl.constexpr(-2147483648)


@triton.jit
def sort_key(raw, KEY16: tl.constexpr):
    """Order-preserving int32 key of ``raw`` (a tensor in the logits' own dtype).

    NaN gets the largest key, as in torch.topk / torch.sort (NaN counts as the largest)."""
    if KEY16:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        key = bits ^ ((bits >> 31) & 0x7FFF)
        key = tl.where(key == -1, 0, key) << 16  # -0.0 -> +0.0; the low 16 bits stay zero
        nan_key = 0x7FFF0000
    else:
        bits = raw.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(key == -1, 0, key)  # -0.0 -> +0.0
        nan_key = 0x7FFFFFFF
    return tl.where(raw != raw, nan_key, key)


@triton.jit
def value_key(raw, DT: tl.constexpr, KEY16: tl.constexpr, scale, inv_cap, cap, SCALE: tl.constexpr,
              CAP: tl.constexpr):
    """The key S is chosen by for logits ``raw`` (their own dtype DT, or float32 copies of DT values):
    the key of z' (float32: KEY16 is then False) when a scale or a cap is on, of the logit itself
    otherwise (transform.py)."""
    if SCALE or CAP:
        return sort_key(transformed(raw.to(tl.float32), scale, inv_cap, cap, SCALE, CAP), KEY16)
    else:
        return sort_key(raw.to(DT), KEY16)


@triton.jit
def row_histograms(digits, mask, BR: tl.constexpr, W: tl.constexpr):
    """A 256-bin histogram of each row of ``digits`` [BR, W] (values in [0, 256)): [BR, 256]."""
    if BR == 1:
        hist = tl.histogram(tl.reshape(digits, [W]), 256, mask=tl.reshape(mask, [W]))
    else:
        bins = tl.arange(0, BR)[:, None] * 256 + digits
        hist = tl.histogram(tl.reshape(bins, [BR * W]), BR * 256, mask=tl.reshape(mask, [BR * W]))
    return tl.reshape(hist, [BR, 256])


@triton.jit
def pick_bucket(hist, kk):
    """Per row: the largest digit b with count(digit >= b) >= kk, and count(digit > b)."""
    at_least = tl.cumsum(hist, 1, reverse=True)  # non-increasing in b; at_least[0] = total >= kk
    b = tl.maximum(tl.sum((at_least >= kk[:, None]).to(tl.int32), 1) - 1, 0)
    above = tl.sum(tl.where(tl.arange(0, 256)[None, :] > b[:, None], hist, 0), 1)
    return b, above


@triton.jit
def radix_bound_registers(keys, ok, kk, NPASS: tl.constexpr, BR: tl.constexpr, W: tl.constexpr):
    """Per row, a lower bound on the kk-th largest of ``keys[ok]`` ([BR, W] in registers):
    the kk-th largest key with all but its first ``8 * NPASS`` bits cleared."""
    u = keys ^ SIGN
    prefix = tl.zeros_like(kk)
    for p in tl.static_range(NPASS):
        SHIFT = 24 - 8 * p
        if p == 0:
            match = ok
        else:
            match = ok & (((u ^ prefix[:, None]) >> (SHIFT + 8)) == 0)
        b, above = pick_bucket(row_histograms((u >> SHIFT) & 255, match, BR, W), kk)
        kk = kk - above
        prefix = prefix | (b << SHIFT)
    return prefix ^ SIGN


@triton.jit
def radix_kth(row_ptrs, n, kk, DT: tl.constexpr, KEY16: tl.constexpr,
              NPASS: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr,
              scale, inv_cap, cap, SCALE: tl.constexpr, CAP: tl.constexpr):
    """Per row r: the kk-th largest key among ``row_ptrs[r][0:n[r]]`` and how many values
    equal to it belong to the top kk (``need`` >= 1). Values are stored as DT, or as float32
    copies of DT values (converted back exactly); the keys are ``value_key``'s. Rows need
    1 <= kk <= n; a row with n = 0 gets a meaningless result and costs nothing."""
    u_prefix = tl.zeros_like(kk)
    n_max = tl.max(n, 0)
    for p in tl.static_range(NPASS):
        SHIFT = 24 - 8 * p
        hist = tl.zeros([BR, 256], tl.int32)
        for start in range(0, n_max, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs[None, :] < n[:, None]
            raw = tl.load(row_ptrs[:, None] + offs[None, :], mask=inside, other=0.0)
            u = value_key(raw, DT, KEY16, scale, inv_cap, cap, SCALE, CAP) ^ SIGN
            if p == 0:
                match = inside
            else:
                match = inside & (((u ^ u_prefix[:, None]) >> (SHIFT + 8)) == 0)
            hist += row_histograms((u >> SHIFT) & 255, match, BR, BLOCK)
        b, above = pick_bucket(hist, kk)
        kk = kk - above
        u_prefix = u_prefix | (b << SHIFT)
    return u_prefix ^ SIGN, kk


@triton.jit
def compact(val_ptrs, idx_ptrs, n, t_key, need, out_idx_ptrs, out_val_ptrs, limit, temperature, z_max,
            DT: tl.constexpr, KEY16: tl.constexpr,
            IDX_FROM_PTR: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr,
            scale, inv_cap, cap, SCALE: tl.constexpr, CAP: tl.constexpr):
    """Per row, walk ``val_ptrs[r][0:n[r]]`` in index order and take every key > t_key and
    the first ``need`` keys == t_key. When WRITE, writes the taken (vocabulary index,
    value) pairs to ``out_idx_ptrs[r][0:limit]`` / ``out_val_ptrs[r]``; the vocabulary index
    is ``idx_ptrs[r][i]`` when IDX_FROM_PTR, else i. The values written are the logits
    themselves; the keys, the sum and the minimum are those of z' (``value_key``).

    Returns per row: sum over S of exp((z' - max z') / T), min over S of z' (NaN left out), and the largest
    vocabulary index taken among the values equal to the threshold (-1 if none)."""
    taken = tl.zeros_like(need)
    ties_seen = tl.zeros_like(need)
    z_sum = tl.zeros_like(z_max)
    z_min = tl.zeros_like(z_max) + float("inf")
    tie_cut = tl.zeros_like(need) - 1
    n_max = tl.max(n, 0)
    for start in range(0, n_max, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs[None, :] < n[:, None]
        val = tl.load(val_ptrs[:, None] + offs[None, :], mask=inside, other=0.0)
        if SCALE or CAP:
            zf = transformed(val.to(tl.float32), scale, inv_cap, cap, SCALE, CAP)
            key = sort_key(zf, KEY16)
        else:
            key = sort_key(val.to(DT), KEY16)
        tie = inside & (key == t_key[:, None])
        tie_rank = ties_seen[:, None] + tl.cumsum(tie.to(tl.int32), 1) - 1
        tie_taken = tie & (tie_rank < need[:, None])
        sel = (inside & (key > t_key[:, None])) | tie_taken
        if IDX_FROM_PTR:
            vocab = tl.load(idx_ptrs[:, None] + offs[None, :], mask=inside, other=0)
        else:
            vocab = tl.zeros_like(key) + offs[None, :]
        if WRITE:
            pos = taken[:, None] + tl.cumsum(sel.to(tl.int32), 1) - 1
            inside_s = sel & (pos < limit)  # always true when the counts are right; never write past S
            tl.store(out_idx_ptrs[:, None] + pos, vocab, mask=inside_s)
            tl.store(out_val_ptrs[:, None] + pos, val.to(out_val_ptrs.dtype.element_ty), mask=inside_s)
        if not (SCALE or CAP):
            zf = val.to(tl.float32)
        z_sum += tl.sum(tl.where(sel, tl.exp(tl.div_rn(zf - z_max[:, None], temperature)), 0.0), 1)
        z_min = tl.minimum(z_min, tl.min(tl.where(sel & (zf == zf), zf, float("inf")), 1))
        tie_cut = tl.maximum(tie_cut, tl.max(tl.where(tie_taken, vocab, -1), 1))
        taken += tl.sum(sel.to(tl.int32), 1)
        ties_seen += tl.sum(tie.to(tl.int32), 1)
    return z_sum, z_min, tie_cut
