"""Forward kernels: per-row statistics and top-K selection, then the cosine term.

Both kernels handle a block of BR rows per step ([BR, BV] tiles): BR = 1 on a GPU (one row
per program step, the natural mapping), larger under the interpreter, whose cost is per
operation.

``row_stats_kernel`` (persistent: program p takes row blocks p, p + G, ...):
  pass 0   one read of the row: per-lane running max and sum of exponentials
           (log sum exp(z - max): every later use works relative to the row max, as
           log_softmax does), per-lane argmax (ties: lower index);
  bound    the lane maxima (BV of them) are a subset of the row, so their K-th largest
           is a lower bound L on the row's K-th largest; two radix passes over those BV
           keys, in registers, give L to 16 bits;
  pass 1   second read of the row (from L2): the candidates (key >= L) in index order to
           a per-program scratch of capacity C (typically a little over K of them);
  select   radix passes over the candidates give the exact K-th key t and how many keys
           equal to t are taken; a compaction writes S (vocabulary index, value) in index
           order, the softmax normaliser over S at temperature T, the threshold value and
           the largest taken index among ties (``tie_cut``): together they make "v in S"
           an elementwise test for the backward;
  fallback rows with more than C candidates (adversarial rows, many -inf) redo the radix
           passes and the compaction over the whole row.
MODE 0 skips the selection (no cosine term); MODE 2 finds the threshold over the whole
row without writing S (the dense path for large K). With GRAD (the loss's gradient computed
in the forward: ``forward_backward_rows``) a last pass over the row writes its gradient
outside S, as backward_rows_kernel would, so the backward does not read the logits again.
With the loss options (constexpr SCALE / CAP / SMOOTH, docs/triton_kernel.md) every logit is
turned into z' as it is loaded (transform.py) and S is chosen by float32 keys of z'; SMOOTH
adds to pass 0 the per-lane sum of z' - max that the smoothed cross-entropy needs.

``cosine_kernel``: mu = sum_S w_i E[i] in chunks of H (gather.py), e = E[y], and cos; saves
cos, |mu|, |e| and mu . e per row, not mu itself (the backward recomputes it by chunks).

Each kernel's launcher follows it (``launch_row_stats``, ``launch_cosine``); the per-row
statistics go to the named columns of layout.py. A pointer a mode does not use is None
(a constexpr None to triton: the code that would use it is not generated).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .tiles import SPARSE
from .backward import cosine_rows, write_outside_s
from .gather import expected_embedding
from .layout import (COS_DOT, COS_NORM_E, COS_NORM_MU, COS_VALUE, STAT_LOG_SUM, STAT_MAX, STAT_S_SUM, STAT_THRESHOLD,
                     column)
from .select import compact, radix_bound_registers, radix_kth, sort_key, value_key
from .transform import smoothing_args, transform_args, transformed, transforms


EPS = tl.constexpr(1e-12)
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: start of the running max, below every finite value
INT_BIG = tl.constexpr(2147483647)


@triton.jit
def row_stats_kernel(
    logits_ptr, stride_row, labels_ptr, N, V, K, C, ignore_index, temperature,
    ce_ptr, correct_ptr, stats_ptr, tie_ptr, s_idx_ptr, s_val_ptr, scratch_idx_ptr, scratch_val_ptr,
    grad_ce_ptr, grad_cos_ptr, grad_lse_square_ptr, dlogits_ptr, out_stride, scale, inv_cap, cap, smoothing,
    MODE: tl.constexpr, KEY16: tl.constexpr, NPASS: tl.constexpr, GRAD: tl.constexpr,
    SCALE: tl.constexpr, CAP: tl.constexpr, SMOOTH: tl.constexpr,
    BR: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, BG: tl.constexpr,
):
    DT: tl.constexpr = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    lanes = tl.arange(0, BV)
    local = tl.arange(0, BR)
    scratch_rows = (tl.cast(pid, tl.int64) * BR + local) * C
    for block in range(pid, tl.cdiv(N, BR), n_prog):
        rows = block * BR + local
        rows64 = tl.cast(rows, tl.int64)
        row_in = rows < N
        y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
        valid = row_in & (y != ignore_index)
        row_ptrs = logits_ptr + rows64 * stride_row
        zero = tl.zeros([BR], tl.float32)
        ce = zero
        correct = tl.zeros([BR], tl.int32)
        log_sum = zero
        z_max = zero
        z_sum = zero
        t_val = zero
        tie_cut = tl.zeros([BR], tl.int32) - 1
        if tl.max(valid.to(tl.int32), 0) > 0:
            # pass 0: logsumexp, argmax, lane maxima
            m_vec = tl.full([BR, BV], NEG_BIG, tl.float32)
            s_vec = tl.zeros([BR, BV], tl.float32)
            arg_vec = tl.zeros([BR, BV], tl.int32) + lanes[None, :]
            d_vec = tl.zeros([BR, BV], tl.float32)  # SMOOTH: sum of (z' - the lane's running max) over the lane
            for start in range(0, V, BV):
                offs = start + lanes
                inside = valid[:, None] & (offs < V)[None, :]
                z = tl.load(row_ptrs[:, None] + offs[None, :], mask=inside, other=float("-inf")).to(tl.float32)
                if SCALE or CAP:
                    z = transformed(z, scale, inv_cap, cap, SCALE, CAP)
                    if CAP:  # the cap would make the -inf padding -c, an entry
                        z = tl.where(inside, z, float("-inf"))
                better = z > m_vec  # false for NaN and for the -inf padding
                m_new = tl.where(better, z, m_vec)
                s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(z - m_new)  # a NaN propagates into s
                if SMOOTH:
                    # the lane's start // BV earlier entries move with its max (a NaN / -inf max: never better)
                    shift = tl.where(better & (start > 0), (m_vec - m_new) * (start // BV), 0.0)
                    d_vec = d_vec + shift + tl.where(inside, z - m_new, 0.0)
                arg_vec = tl.where(better, offs[None, :], arg_vec)
                m_vec = m_new
            m = tl.max(m_vec, 1)
            # log sum exp(z - max), not lse = max + that: lse would round to ulp(|max|), and
            # that rounding would leak into ce and the gradient of offset logits
            log_sum = tl.log(tl.where(valid, tl.sum(s_vec * tl.exp(m_vec - m[:, None]), 1), 1.0))
            argmax = tl.min(tl.where(m_vec == m[:, None], arg_vec, INT_BIG), 1)
            has_nan = valid & (log_sum != log_sum)
            if tl.max(has_nan.to(tl.int32), 0) > 0:  # argmax of a row with NaN is its first NaN, as torch.argmax
                first_nan = tl.zeros([BR], tl.int32) + INT_BIG
                for start in range(0, V, BV):
                    offs = start + lanes
                    z = tl.load(row_ptrs[:, None] + offs[None, :], mask=has_nan[:, None] & (offs < V)[None, :],
                                other=0.0)
                    first_nan = tl.minimum(first_nan, tl.min(tl.where(z != z, offs[None, :], INT_BIG), 1))
                argmax = tl.where(first_nan < INT_BIG, first_nan, argmax)
            z_y = tl.load(row_ptrs + y, mask=valid, other=0.0).to(tl.float32)
            if SCALE or CAP:
                z_y = transformed(z_y, scale, inv_cap, cap, SCALE, CAP)
            if SMOOTH:
                # mean_v z'_v - max: each lane's sum moved to the row max, over its entries
                lane_count = tl.maximum(tl.cdiv(V - lanes, BV), 0)[None, :]
                to_row_max = tl.where(lane_count > 0, (m_vec - m[:, None]) * lane_count, 0.0)
                mean_rel = tl.sum(d_vec + to_row_max, 1) / V
                ce = tl.where(valid, log_sum - (1.0 - smoothing) * (z_y - m) - smoothing * mean_rel, 0.0)
            else:
                ce = tl.where(valid, log_sum - (z_y - m), 0.0)
            correct = (valid & (argmax == y)).to(tl.int32)
            log_sum = tl.where(valid, log_sum, 0.0)
            z_max = tl.where(valid, tl.where(m <= NEG_BIG, float("-inf"), m), 0.0)
            if MODE != 0:
                out_idx = None  # S is written in MODE 1 only
                out_val = None
                if MODE == 1:
                    out_idx = s_idx_ptr + rows64 * K
                    out_val = s_val_ptr + rows64 * K
                kk = tl.zeros([BR], tl.int32) + K
                n_row = tl.where(valid, V, 0)
                if MODE == 1:
                    if K < V:
                        # lower bound from the lane maxima, then the candidates
                        # (the keys of z', float32, when a scale or cap is on: the launcher's KEY16 is False then)
                        lane_max = tl.where(m_vec <= NEG_BIG, float("-inf"), m_vec)
                        if not (SCALE or CAP):
                            lane_max = lane_max.to(DT)
                        ok = valid[:, None] & (lanes < V)[None, :]
                        bound = radix_bound_registers(sort_key(lane_max, KEY16), ok, kk, 2, BR, BV)
                        count = tl.zeros([BR], tl.int32)
                        for start in range(0, V, BV):
                            offs = start + lanes
                            inside = valid[:, None] & (offs < V)[None, :]
                            raw = tl.load(row_ptrs[:, None] + offs[None, :], mask=inside, other=float("-inf"))
                            cand = inside & (value_key(raw, DT, KEY16, scale, inv_cap, cap, SCALE, CAP)
                                             >= bound[:, None])
                            pos = count[:, None] + tl.cumsum(cand.to(tl.int32), 1) - 1
                            keep = cand & (pos < C)
                            tl.store(scratch_idx_ptr + scratch_rows[:, None] + pos, tl.zeros_like(pos) + offs[None, :],
                                     mask=keep)
                            tl.store(scratch_val_ptr + scratch_rows[:, None] + pos, raw.to(tl.float32), mask=keep)
                            count += tl.sum(cand.to(tl.int32), 1)
                        # the scratch was written by other threads of this program: make it visible
                        tl.debug_barrier()
                        over = valid & (count > C)
                        n_scratch = tl.where(valid & ~over, count, 0)
                        t_key, need = radix_kth(scratch_val_ptr + scratch_rows, n_scratch, kk, DT, KEY16,
                                                NPASS, BR, BC, scale, inv_cap, cap, SCALE, CAP)
                        z_sum, t_val, tie_cut = compact(
                            scratch_val_ptr + scratch_rows, scratch_idx_ptr + scratch_rows, n_scratch, t_key, need,
                            out_idx, out_val, K, temperature, z_max, DT, KEY16, True, True, BC,
                            scale, inv_cap, cap, SCALE, CAP)
                        n_row = tl.where(over, V, 0)
                if tl.max(n_row, 0) > 0:  # MODE 2, K >= V, or rows with too many candidates
                    t_key2 = tl.zeros([BR], tl.int32) + (-2147483647 - 1)  # below every key: K >= V takes all
                    need2 = tl.zeros([BR], tl.int32)
                    if K < V:
                        t_key2, need2 = radix_kth(row_ptrs, n_row, kk, DT, KEY16, NPASS, BR, BV,
                                                  scale, inv_cap, cap, SCALE, CAP)
                    z_sum2, t_val2, tie_cut2 = compact(
                        row_ptrs, row_ptrs, n_row, t_key2, need2, out_idx, out_val, K, temperature, z_max,
                        DT, KEY16, False, MODE == 1, BV, scale, inv_cap, cap, SCALE, CAP)
                    if K >= V:  # S is the whole row: make the membership test say so
                        t_val2 = tl.zeros([BR], tl.float32) + float("-inf")
                        tie_cut2 = tl.zeros([BR], tl.int32) + (V - 1)
                    from_rows = n_row > 0
                    z_sum = tl.where(from_rows, z_sum2, z_sum)
                    t_val = tl.where(from_rows, t_val2, t_val)
                    tie_cut = tl.where(from_rows, tie_cut2, tie_cut)
        tl.store(ce_ptr + rows64, ce, mask=row_in)
        tl.store(correct_ptr + rows64, correct.to(tl.int8), mask=row_in)
        tl.store(column(stats_ptr, rows64, STAT_LOG_SUM), log_sum, mask=row_in)
        tl.store(column(stats_ptr, rows64, STAT_MAX), z_max, mask=row_in)
        tl.store(column(stats_ptr, rows64, STAT_S_SUM), z_sum, mask=row_in)
        tl.store(column(stats_ptr, rows64, STAT_THRESHOLD), t_val, mask=row_in)
        tl.store(tie_ptr + rows64, tie_cut, mask=row_in)
        if GRAD:
            # the gradient outside S, from the row again (from L2: it was just read); every other
            # thread is done reading the row first, since the gradient may be written over it
            tl.debug_barrier()
            g_ce = tl.load(grad_ce_ptr + rows64, mask=valid, other=0.0)
            g_lse = zero
            if grad_lse_square_ptr is not None:  # the z-loss: d (g lse^2) / d lse = 2 g lse, lse known now
                g_lse = 2.0 * tl.load(grad_lse_square_ptr + rows64, mask=valid, other=0.0) * (z_max + log_sum)
            exclude = tl.zeros([BR], tl.int1)
            if MODE == 1:
                exclude = cosine_rows(grad_cos_ptr, rows64, valid, log_sum)
            write_outside_s(row_ptrs, dlogits_ptr + rows64 * out_stride, y, row_in, valid, g_ce, g_lse, z_max,
                            log_sum, exclude, t_val, tie_cut, V, smoothing, scale, inv_cap, cap,
                            grad_lse_square_ptr is not None, SMOOTH, SCALE, CAP, BG)
        if MODE == 1 or GRAD:
            tl.debug_barrier()  # every read of the scratch (and of the row) is done before the next block


@triton.jit
def cosine_kernel(
    emb_ptr, labels_ptr, stats_ptr, s_idx_ptr, s_val_ptr, cstats_ptr,
    N, K, H, ignore_index, temperature, scale, inv_cap, cap,
    SCALE: tl.constexpr, CAP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    rows64 = tl.cast(tl.program_id(0), tl.int64) * BR + tl.arange(0, BR)
    row_in = rows64 < N
    y = tl.load(labels_ptr + rows64, mask=row_in, other=ignore_index)
    valid = row_in & (y != ignore_index)
    zero = tl.zeros([BR], tl.float32)
    cos = zero
    norm_mu = zero
    norm_e = zero
    dot = zero
    if tl.max(valid.to(tl.int32), 0) > 0:
        log_sum = tl.load(column(stats_ptr, rows64, STAT_LOG_SUM), mask=valid, other=0.0)
        z_max = tl.load(column(stats_ptr, rows64, STAT_MAX), mask=valid, other=0.0)
        z_sum = tl.load(column(stats_ptr, rows64, STAT_S_SUM), mask=valid, other=1.0)
        dot_vec = tl.zeros([BR, BH], tl.float32)
        mu2_vec = tl.zeros([BR, BH], tl.float32)
        e2_vec = tl.zeros([BR, BH], tl.float32)
        e_rows = emb_ptr + tl.where(valid, y, 0) * H
        for h0 in range(0, H, BH):
            h = h0 + tl.arange(0, BH)
            h_in = h < H
            mu = expected_embedding(emb_ptr, s_idx_ptr, s_val_ptr, rows64, valid, z_max, z_sum, K, H, h, h_in,
                                    temperature, scale, inv_cap, cap, SCALE, CAP, BR=BR, BK=BK, BH=BH)
            e = tl.load(e_rows[:, None] + h[None, :], mask=valid[:, None] & h_in[None, :], other=0.0).to(tl.float32)
            dot_vec += mu * e
            mu2_vec += mu * mu
            e2_vec += e * e
        dot = tl.sum(dot_vec, 1)
        norm_mu = tl.sqrt(tl.sum(mu2_vec, 1))
        norm_e = tl.sqrt(tl.sum(e2_vec, 1))
        cos = dot / (tl.maximum(norm_mu, EPS) * tl.maximum(norm_e, EPS))
        cos = tl.where(log_sum != log_sum, float("nan"), cos)
    tl.store(column(cstats_ptr, rows64, COS_VALUE), cos, mask=row_in)
    tl.store(column(cstats_ptr, rows64, COS_NORM_MU), norm_mu, mask=row_in)
    tl.store(column(cstats_ptr, rows64, COS_NORM_E), norm_e, mask=row_in)
    tl.store(column(cstats_ptr, rows64, COS_DOT), dot, mask=row_in)


def launch_row_stats(logits, labels, *, ce, correct, stats, tie, s_idx=None, s_val=None, mode, options,
                     gradient=None):
    """row_stats_kernel over every row: ``ce``, ``correct``, ``stats`` and ``tie``, and S into
    ``s_idx`` (int32) / ``s_val`` in the SPARSE mode (whose candidate scratch is allocated here).
    With ``gradient = (grad_ce, grad_cos, grad_lse_square, dlogits)`` it also writes the logits
    gradient outside S into ``dlogits`` (which may be the logits); ``grad_lse_square`` (or None)
    weighs lse_n ** 2 (the z-loss)."""
    n, vocab = logits.shape
    k = options.k
    rows = tiles.rows_per_step(n)
    programs = tiles.num_programs(triton.cdiv(n, rows), logits.device)
    capacity = tiles.candidate_capacity(k)
    scratch_idx = scratch_val = None
    if mode == SPARSE:
        scratch_idx = torch.empty(programs * rows * capacity, device=logits.device, dtype=torch.int32)
        scratch_val = torch.empty(programs * rows * capacity, device=logits.device, dtype=torch.float32)
    grad_ce, grad_cos, grad_lse_square, dlogits = gradient if gradient is not None else (None, None, None, None)
    key_dtype = torch.float32 if transforms(options) else logits.dtype  # S is chosen by z' in float32
    key16, npass = tiles.key_constants(key_dtype)
    heavy = options.softcap is not None or options.label_smoothing != 0.0
    row_stats_kernel[(programs,)](
        # inputs
        logits_ptr=logits, stride_row=logits.stride(0), labels_ptr=labels,
        # outputs, and the selection's scratch
        ce_ptr=ce, correct_ptr=correct, stats_ptr=stats, tie_ptr=tie, s_idx_ptr=s_idx, s_val_ptr=s_val,
        scratch_idx_ptr=scratch_idx, scratch_val_ptr=scratch_val,
        # the gradient in the forward
        grad_ce_ptr=grad_ce, grad_cos_ptr=grad_cos, grad_lse_square_ptr=grad_lse_square, dlogits_ptr=dlogits,
        out_stride=dlogits.stride(0) if dlogits is not None else 0,
        # shapes and options
        N=n, V=vocab, K=k, C=capacity, ignore_index=options.ignore_index, temperature=float(options.temperature),
        **transform_args(options), **smoothing_args(options),
        # constexprs
        MODE=mode, KEY16=key16, NPASS=npass, GRAD=gradient is not None,
        BR=rows, BV=tiles.row_kernel_lanes(vocab, k, mode, heavy), BC=tiles.scratch_block(capacity),
        BG=tiles.gradient_pass_lanes(vocab, mode, heavy),
        **tiles.row_kernel_options(key_dtype, mode),
    )


def launch_cosine(embedding, labels, *, stats, s_idx, s_val, cstats, options):
    """cosine_kernel over every row: the COS_* columns of ``cstats`` from S and the row kernel's ``stats``."""
    n, hidden = labels.shape[0], embedding.shape[1]
    tile = tiles.gather_tiles(n, options.k, hidden)
    cosine_kernel[(triton.cdiv(n, tile["BR"]),)](
        # inputs
        emb_ptr=embedding, labels_ptr=labels, stats_ptr=stats, s_idx_ptr=s_idx, s_val_ptr=s_val,
        # output
        cstats_ptr=cstats,
        # shapes and options
        N=n, K=options.k, H=hidden, ignore_index=options.ignore_index, temperature=float(options.temperature),
        **transform_args(options),
        # constexprs
        BR=tile["BR"], BK=tile["BK"], BH=tile["BH"], **tiles.cosine_options(transforms(options)),
    )
