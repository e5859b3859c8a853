"""The Triton backend (``backend="triton"``): the kernel-backend protocol of
``fused_cosloss._kernel_function`` over the kernels of this package.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (the interpreter: slow, for tests). Logits and embedding may each
be float32, bfloat16 or float16; all arithmetic is float32. Design and cost model:
docs/triton_kernel.md.

* sparse path (``k <= SPARSE_MAX_K`` = 1024). Forward: ``row_stats_kernel`` (logsumexp,
  argmax, radix top-k) -> ``cosine_kernel`` (mu over the k gathered rows, cos). Saved between
  forward and backward: S's indices (int16 up to V = 65536, else int32) and values ``[N, k]``
  and eight scalars per row (not mu).
  Backward: ``backward_rows_kernel`` (the logits gradient outside S) -> the entries of S
  grouped by vocabulary row (``_grouped_entries``) -> per chunk of H columns,
  ``direction_chunk_kernel`` (mu recomputed, g = d cos / d mu) and ``embedding_grad_kernel``
  (the vocabulary pass: s = E[v] . g summed over the chunks, and dE, no atomics) ->
  ``selected_grad_kernel`` (s_bar = sum_S w s per row, the logits gradient on S).
* dense path (``k > SPARSE_MAX_K``, e.g. ``topk=None`` on a real vocabulary): the row kernel
  finds the threshold of S, and the cosine term goes through matrix products with E in
  blocks of rows; extra memory: mu ``[N, H]`` float32 (saved), a few ``[rows, V]`` float32
  temporaries of at most ``DENSE_BLOCK_ELEMENTS`` elements, a float32 copy of E when E is
  16-bit, and a float32 ``[V, H]`` accumulator of dE.
* ``with_cos=False``: only logsumexp / argmax in the forward and the dense CE gradient.
"""
from __future__ import annotations

import os

import torch
import triton

from .backward import backward_rows_kernel, direction_chunk_kernel, selected_grad_kernel
from .embedding_grad import embedding_grad_kernel
from .forward import cosine_kernel, row_stats_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-12

# Largest k on the sparse path; a larger k (topk=None on a real vocabulary) takes the dense path.
SPARSE_MAX_K = 1024
# Capacity of the per-program candidate scratch of the selection (None: max(4 * k, 2048)).
# A row with more candidates than this falls back to a radix select over the whole row.
CANDIDATE_CAPACITY: int | None = None
# Entries of S sorted per piece of consecutive rows (the sort's temporaries are those of one piece).
PIECE_ENTRIES = 1 << 18
# Columns of H per chunk of the backward (None: from HIDDEN_CHUNK_SHARE below).
HIDDEN_CHUNK: int | None = None
# The backward's two float32 [N, C] chunk buffers take at most this share of the logits' bytes.
HIDDEN_CHUNK_SHARE = 1 / 64
# The vocabulary pass holds a chunk of an embedding row in registers: at 1024 columns it spills
# 8 bytes on sm_80 with triton 3.6 (tests/test_triton_compile.py).
MAX_HIDDEN_CHUNK = 512
# Dense path: rows per block chosen so that a [rows, V] float32 temporary has at most this many elements.
DENSE_BLOCK_ELEMENTS = 1 << 22
# Persistent row-kernel programs per SM: rows in flight re-read from L2 in the selection's second
# pass (2 per SM x 132 SMs x ~100 KB per bfloat16 row of 50257 stays well inside an H100's 50 MB L2).
PROGRAMS_PER_SM = 2
# Under the interpreter the kernels take blocks of rows (its cost is per operation); False makes
# them take the GPU's tiles there too (slow: for a test of the GPU configuration's code paths).
INTERPRETER_TILES = True
# Warps per program of each kernel.
NUM_WARPS = dict(NW_ROW=8, NW_COS=4, NW_BWD=8)
# Register cap of the row kernel's dense mode (k > SPARSE_MAX_K): left to ptxas it stays near
# 80 registers on sm_80 and spills (triton 3.9); the dense path is the slow path, so it may
# take the registers it needs at one program per SM.
DENSE_ROW_MAXNREG = 255
# The sparse row kernel at 8 warps, with its register cap made explicit: left to ptxas, the cap
# for two programs per SM (128) spilled 8-16 bytes with triton 3.7 (bf16 logits), and 3.8 held
# it at 64 registers with the gradient pass and spilled 8 bytes on sm_80. float32 logits take
# four radix passes instead of two and need more: at 168 registers (one program per SM) no
# version from 3.6 to 3.9 spills; at 16 warps and 128, 3.6 spilled 8 bytes with the gradient pass.
SPARSE_ROW_MAXNREG = {torch.float32: 168, torch.bfloat16: 128, torch.float16: 128}


def row_kernel_options(dtype: torch.dtype, mode: int) -> dict:
    """Launch options (num_warps, maxnreg) of the forward row kernel for logits of this dtype in this mode."""
    maxnreg = {0: None, 1: SPARSE_ROW_MAXNREG[dtype], 2: DENSE_ROW_MAXNREG}[mode]
    return dict(num_warps=NUM_WARPS["NW_ROW"], maxnreg=maxnreg)


def _interpreted() -> bool:
    """Whether this module's kernels were built for the triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(row_stats_kernel, InterpretedFunction)


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
        if not _interpreted():
            return "TRITON_INTERPRET=1 was set after triton compiled the kernels; set it before importing triton"
        return None
    return f"triton does not run on {device} tensors"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _capacity(k: int) -> int:
    return CANDIDATE_CAPACITY if CANDIDATE_CAPACITY is not None else max(4 * k, 2048)


def _num_programs(n_blocks: int, device: torch.device) -> int:
    if device.type == "cuda" and not _interpreted():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, PROGRAMS_PER_SM * sms))
    return max(1, min(n_blocks, 2))


def _tiles(n: int, k: int, hidden: int) -> dict:
    """Tile sizes: one row per program step on a GPU; blocks of rows under the interpreter,
    whose cost is per operation rather than per element."""
    if _interpreted() and INTERPRETER_TILES:
        rows = min(16, _next_pow2(n))
        block_h = min(64, max(16, _next_pow2(hidden)))
        block_k = min(256, max(16, _next_pow2(k)))
        return dict(BR=rows, BK=block_k, BH=block_h, **NUM_WARPS)
    # register counts of these tiles (no spills) are checked by tests/test_triton_compile.py
    return dict(BR=1, BK=8, BH=_hidden_block(hidden, 256), **NUM_WARPS)


def _vocab_tiles(chunk: int) -> dict:
    """The vocabulary pass holds a chunk of embedding row (BC >= C columns) and BE entries of a segment at a time."""
    padded = max(16, _next_pow2(chunk))
    if _interpreted() and INTERPRETER_TILES:
        return dict(VB=64, BE=8, BC=padded, NW=4, MAXNREG=None)
    # left alone, ptxas holds it at 80 registers and spills 8 bytes at C = 512 (sm_80, triton 3.9)
    return dict(VB=1, BE=max(1, min(8, 2048 // padded)), BC=padded, NW=8, MAXNREG=128)


def _key_constants(dtype: torch.dtype):
    """(16-bit keys, radix passes): 16-bit dtypes are resolved in two 8-bit passes, float32 in four."""
    key16 = dtype != torch.float32
    return key16, 2 if key16 else 4


def _empty(device, dtype=torch.float32):
    return torch.empty(0, device=device, dtype=dtype)


def _scratch_block(capacity: int) -> int:
    return min(1024, max(16, _next_pow2(capacity)))


def _row_block(vocab: int) -> int:
    """Lanes of the row kernels' blocks (see row_kernel_lanes for the forward's sparse mode)."""
    return min(2048, max(16, _next_pow2(vocab)))


# Lanes of the forward row kernel in its sparse mode. At 2048 lanes the kernel wants more than
# the 128 registers ptxas gives a 256-thread program (8 warps) and spills with triton 3.6
# (40-72 bytes); at 1024 it takes 113-128 registers there and 76-78 with triton 3.9, no spill
# (tests/test_triton_compile.py). The lane bound then comes from 1024 lane maxima: about
# -1024 ln(1 - 256/1024) = 295 candidates at K = 256 instead of 273.
SPARSE_ROW_LANES = 1024


def row_kernel_lanes(vocab: int, k: int, mode: int) -> int:
    """BV of the forward row kernel: the selection's lane bound needs at least k lanes."""
    if mode == 1:
        return max(min(SPARSE_ROW_LANES, _row_block(vocab)), _next_pow2(k))
    return _row_block(vocab)


def _hidden_block(hidden: int, cap: int) -> int:
    return min(cap, max(16, _next_pow2(hidden)))


def forward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos):
    return _forward(logits, labels, embedding, temperature, k, ignore_index, with_cos)


def forward_backward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos, grad_ce, grad_cos,
                          need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None):
    """``forward_rows`` and ``backward_rows`` in one call, for a loss whose per-row coefficients
    ``grad_ce`` / ``grad_cos`` are known in the forward (-> ce, cos, correct, dlogits, dembedding).
    The row kernel writes the gradient outside S in its last pass over each row (read from
    L2, just read), so the logits are read from device memory once, as Liger-Kernel's
    cross-entropy does; the cosine term's share follows as in ``backward_rows``."""
    n, vocab = logits.shape
    if not need_logits_grad or n == 0 or (with_cos and k > SPARSE_MAX_K):
        ce, cos, correct, saved = _forward(logits, labels, embedding, temperature, k, ignore_index, with_cos)
        dlogits, demb = backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k,
                                      ignore_index, with_cos, need_logits_grad, need_embedding_grad, inplace,
                                      embedding_grad_out)
        return ce, cos, correct, dlogits, demb
    grad_ce = grad_ce.to(torch.float32).contiguous()
    grad_cos = grad_cos.to(torch.float32).contiguous()
    dlogits = logits if inplace else torch.empty(n, vocab, device=logits.device, dtype=logits.dtype)
    ce, cos, correct, saved = _forward(logits, labels, embedding, temperature, k, ignore_index, with_cos,
                                       gradient=(grad_ce, grad_cos, dlogits))
    demb = None
    if with_cos:
        demb = _cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k, ignore_index,
                                dlogits, need_embedding_grad, embedding_grad_out)
    return ce, cos, correct, dlogits, demb


def _forward(logits, labels, embedding, temperature, k, ignore_index, with_cos, gradient=None):
    """forward_rows; with ``gradient = (grad_ce, grad_cos, dlogits)`` the row kernel also writes
    the logits gradient outside S into ``dlogits`` (which may be the logits)."""
    n, vocab = logits.shape
    hidden = embedding.shape[1]
    device = logits.device
    ce = torch.empty(n, device=device, dtype=torch.float32)
    correct = torch.empty(n, device=device, dtype=torch.int8)
    # log sum exp(z - max), row max, sum over S at temperature T (relative to the max), threshold value
    stats = torch.empty(n, 4, device=device, dtype=torch.float32)
    tie = torch.empty(n, device=device, dtype=torch.int32)
    sparse = with_cos and k <= SPARSE_MAX_K
    mode = 0 if not with_cos else (1 if sparse else 2)
    s_idx = torch.empty(n, k, device=device, dtype=torch.int32) if sparse else _empty(device, torch.int32)
    # the values of S in the logits' dtype (exact: they are logits)
    s_val = torch.empty(n, k, device=device, dtype=logits.dtype) if sparse else _empty(device, logits.dtype)
    if n == 0:
        cos = torch.zeros(0, device=device, dtype=torch.float32)
        s_idx = s_idx.to(_index_dtype(vocab)) if sparse else s_idx
        return ce, cos, correct.bool(), (stats, tie, s_idx, s_val, torch.empty(0, hidden, device=device),
                                         torch.empty(0, 4, device=device))

    tiles = _tiles(n, k, hidden)
    rows = tiles["BR"]
    programs = _num_programs(triton.cdiv(n, rows), device)
    capacity = _capacity(k)
    if mode == 1:
        scratch_idx = torch.empty(programs * rows * capacity, device=device, dtype=torch.int32)
        scratch_val = torch.empty(programs * rows * capacity, device=device, dtype=torch.float32)
    else:
        scratch_idx, scratch_val = _empty(device, torch.int32), _empty(device)
    key16, npass = _key_constants(logits.dtype)
    grad_ce, grad_cos, dlogits = gradient if gradient is not None else (_empty(device),) * 3
    row_stats_kernel[(programs,)](
        logits, logits.stride(0), labels, n, vocab, k, capacity, ignore_index, float(temperature),
        ce, correct, stats, tie, s_idx, s_val, scratch_idx, scratch_val,
        grad_ce, grad_cos, dlogits, dlogits.stride(0) if gradient is not None else 0,
        MODE=mode, KEY16=key16, NPASS=npass, GRAD=gradient is not None, BR=rows, BV=row_kernel_lanes(vocab, k, mode),
        BC=_scratch_block(capacity), BG=_row_block(vocab), **row_kernel_options(logits.dtype, mode),
    )
    del scratch_idx, scratch_val
    if sparse and _index_dtype(vocab) != torch.int32:
        # saved in 16 bits; written in 32 by the row kernel, where an int16 store costs registers and spills
        s_idx = s_idx.to(_index_dtype(vocab))
    mu = torch.empty(0, hidden, device=device)  # kept by the dense path only
    if mode == 0:
        cos = torch.zeros(n, device=device, dtype=torch.float32)
        cstats = torch.empty(0, 4, device=device)
    elif mode == 1:
        cstats = torch.empty(n, 4, device=device, dtype=torch.float32)  # cos, |mu|, |e|, mu . e
        cosine_kernel[(triton.cdiv(n, rows),)](
            embedding, labels, stats, s_idx, s_val, cstats, n, k, hidden, ignore_index, float(temperature),
            BR=rows, BK=tiles["BK"], BH=tiles["BH"], num_warps=tiles["NW_COS"],
        )
        cos = cstats[:, 0].clone()
    else:
        mu, cstats = _dense_forward(logits, labels, embedding, stats, tie, temperature, ignore_index)
        cos = cstats[:, 0].clone()
    return ce, cos, correct.bool(), (stats, tie, s_idx, s_val, mu, cstats)


def fake_forward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos):
    """Empty tensors of the shapes and dtypes ``forward_rows`` returns (the custom op's fake kernel)."""
    n, hidden = logits.shape[0], embedding.shape[1]
    device = logits.device
    sparse = with_cos and k <= SPARSE_MAX_K
    saved = (
        torch.empty(n, 4, device=device, dtype=torch.float32),
        torch.empty(n, device=device, dtype=torch.int32),
        torch.empty(n, k, device=device, dtype=_index_dtype(logits.shape[1])) if sparse else _empty(device, torch.int32),
        torch.empty(n, k, device=device, dtype=logits.dtype) if sparse else _empty(device, logits.dtype),
        torch.empty(n if with_cos and not sparse else 0, hidden, device=device, dtype=torch.float32),
        torch.empty(n if with_cos else 0, 4, device=device, dtype=torch.float32),
    )
    ce = torch.empty(n, device=device, dtype=torch.float32)
    cos = torch.empty(n, device=device, dtype=torch.float32)
    return ce, cos, torch.empty(n, device=device, dtype=torch.bool), saved


def backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k, ignore_index, with_cos,
                  need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None):
    stats, tie, s_idx, s_val, mu, cstats = saved
    n, vocab = logits.shape
    device = logits.device
    grad_ce = grad_ce.to(torch.float32).contiguous()
    grad_cos = grad_cos.to(torch.float32).contiguous()
    want_demb = need_embedding_grad and with_cos
    if n == 0:
        dlogits = (logits if inplace else torch.zeros_like(logits)) if need_logits_grad else None
        demb = torch.zeros_like(embedding) if want_demb and embedding_grad_out is None else None
        return dlogits, demb
    if with_cos and k > SPARSE_MAX_K:
        return _dense_backward(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, ignore_index,
                               need_logits_grad, want_demb, inplace, embedding_grad_out)
    dlogits = None
    if need_logits_grad:
        # outside S; the vocabulary pass writes S's entries
        dlogits = logits if inplace else torch.empty(n, vocab, device=device, dtype=logits.dtype)
        rows = _tiles(n, k, embedding.shape[1])["BR"]
        backward_rows_kernel[(triton.cdiv(n, rows),)](
            logits, logits.stride(0), labels, grad_ce, grad_cos, stats, tie, dlogits, dlogits.stride(0),
            n, vocab, ignore_index,
            WITH_COS=with_cos, BR=rows, BV=_row_block(vocab), num_warps=NUM_WARPS["NW_BWD"],
        )
    demb = None
    if with_cos and (need_logits_grad or want_demb):
        demb = _cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k, ignore_index,
                                dlogits, want_demb, embedding_grad_out)
    return dlogits, demb


def _grouped_entries(s_idx, rows_used, vocab):
    """The entries (n, v in S_n) of the rows ``rows_used``, grouped by v: pieces of
    ``piece_rows`` consecutive rows, each sorted by (v, n) into its range of ``entries``
    (positions n * k + j in S's [N, k] buffers; int32, int64 past 2**31) with its own offsets
    ``[pieces, V + 1]`` (int32, within the piece). -> (entries, offsets, pieces, piece_len).
    Sorting piece by piece keeps the sort's temporaries to those of one piece; keys
    v * piece_rows + local row fit in int32."""
    n, k = s_idx.shape
    device = s_idx.device
    piece_rows = max(1, min(n, PIECE_ENTRIES // max(k, 1), (2 ** 31 - 1) // (vocab + 1)))
    pieces = triton.cdiv(n, piece_rows)
    entries = torch.empty(n * k, device=device, dtype=torch.int32 if n * k < 2 ** 31 else torch.int64)
    offsets = torch.empty(pieces, vocab + 1, device=device, dtype=torch.int32)
    boundaries = torch.arange(vocab + 1, device=device, dtype=torch.int32) * piece_rows
    local = torch.arange(piece_rows, device=device, dtype=torch.int32)[:, None]
    for piece, start in enumerate(range(0, n, piece_rows)):
        end = min(n, start + piece_rows)
        indices = s_idx[start:end].to(torch.int32)
        indices = torch.where(indices < 0, indices + 65536, indices)  # int16 storage is read unsigned
        keys = torch.where(rows_used[start:end, None], indices * piece_rows + local[: end - start], vocab * piece_rows)
        del indices
        sorted_keys, order = torch.sort(keys.reshape(-1))  # distinct keys (but the unused): no stability needed
        del keys
        torch.searchsorted(sorted_keys, boundaries, out_int32=True, out=offsets[piece])
        entries[start * k:end * k] = order + start * k
    return entries, offsets, pieces, piece_rows * k


def _index_dtype(vocab: int) -> torch.dtype:
    """S's indices take 16 bits while the vocabulary fits (read back unsigned), else 32."""
    return torch.int16 if vocab <= 65536 else torch.int32


def _target_segments(labels, rows_used, vocab):
    """Rows grouped by label, in row order (``t_rows`` int64), and each label's segment
    ``t_offsets[y] : t_offsets[y + 1]``; rows not used go past the last segment."""
    keys = torch.where(rows_used, labels, vocab)
    sorted_keys, t_rows = torch.sort(keys, stable=True)
    t_offsets = torch.searchsorted(sorted_keys, torch.arange(vocab + 1, device=labels.device, dtype=keys.dtype))
    return t_rows, t_offsets


def hidden_chunk(vocab: int, hidden: int, logits_itemsize: int) -> int:
    """Columns of H per chunk of the backward: a power of two from 32 to MAX_HIDDEN_CHUNK, so
    that its two float32 [N, C] buffers take at most HIDDEN_CHUNK_SHARE of the logits' bytes."""
    if HIDDEN_CHUNK is not None:
        return HIDDEN_CHUNK
    budget = int(vocab * logits_itemsize * HIDDEN_CHUNK_SHARE) // 8
    return min(_next_pow2(hidden), MAX_HIDDEN_CHUNK, 1 << max(5, budget.bit_length() - 1))


def _cosine_backward(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k, ignore_index,
                     dlogits, want_demb, embedding_grad_out):
    """The cosine term's share of the backward (sparse path): dE, and the logits gradient on S
    when ``dlogits`` is given (whose entries outside S backward_rows_kernel already wrote)."""
    stats, tie, s_idx, s_val, _, cstats = saved
    n, vocab = logits.shape
    hidden = embedding.shape[1]
    device = logits.device
    rows_used = (labels != ignore_index) & (grad_cos != 0)
    entries, offsets, pieces, piece_len = _grouped_entries(s_idx, rows_used, vocab)
    t_rows, t_offsets = _target_segments(labels, rows_used, vocab) if want_demb else (_empty(device, torch.int64),) * 2
    chunk = hidden_chunk(vocab, hidden, logits.element_size())
    chunks = list(range(0, hidden, chunk))
    write_dz = dlogits is not None
    g = torch.empty(n, chunk, device=device, dtype=torch.float32)
    t = torch.empty(n, chunk, device=device, dtype=torch.float32) if want_demb else _empty(device)
    # s = E[v] . g of S's entries, summed over the chunks, in S's [N, k] order
    s_dot = torch.empty(n, k, device=device, dtype=torch.float32) if write_dz else _empty(device)
    demb = None
    if want_demb:
        demb = embedding_grad_out if embedding_grad_out is not None else torch.empty_like(embedding)
    tiles = _tiles(n, k, hidden)
    vtiles = _vocab_tiles(chunk)
    for index, h0 in enumerate(chunks):
        direction_chunk_kernel[(triton.cdiv(n, tiles["BR"]),)](
            embedding, labels, s_idx, s_val, stats, cstats, grad_cos, g, t,
            n, k, hidden, h0, chunk, ignore_index, float(temperature),
            WRITE_T=want_demb, BR=tiles["BR"], BK=tiles["BK"], BH=min(tiles["BH"], _next_pow2(chunk)),
            num_warps=tiles["NW_COS"],
        )
        embedding_grad_kernel[(triton.cdiv(vocab, vtiles["VB"]),)](
            demb if want_demb else _empty(device, embedding.dtype),
            embedding_grad_out if embedding_grad_out is not None else _empty(device), embedding, s_val,
            entries, offsets, s_dot, pieces, piece_len, k, t_rows, t_offsets,
            g, t, chunk, stats, grad_cos,
            vocab, hidden, h0, chunk, float(temperature),
            FIRST=index == 0, WRITE_S=write_dz, WRITE_DE=want_demb, HAS_BASE=embedding_grad_out is not None,
            VB=vtiles["VB"], BE=vtiles["BE"], BC=vtiles["BC"], num_warps=vtiles["NW"], maxnreg=vtiles["MAXNREG"],
        )
    del g, t
    if write_dz:
        selected_grad_kernel[(triton.cdiv(n, tiles["BR"]),)](
            labels, s_idx, s_val, s_dot, stats, grad_ce, grad_cos, dlogits, dlogits.stride(0),
            n, k, ignore_index, float(temperature),
            BR=tiles["BR"], BK=_selected_block(k), num_warps=tiles["NW_COS"],
        )
    return None if embedding_grad_out is not None else demb


def _selected_block(k: int) -> int:
    """Entries of S per step of selected_grad_kernel: the whole of S up to 1024 on a GPU (one
    row per program), 64 under the interpreter's blocks of rows."""
    if _interpreted() and INTERPRETER_TILES:
        return min(64, max(16, _next_pow2(k)))
    return min(1024, max(16, _next_pow2(k)))


# ---------------------------------------------------------------------------------------------
# Dense path (k > SPARSE_MAX_K): S given by the threshold the row kernel found; the cosine term
# through matrix products with E over blocks of rows.


def _dense_blocks(n: int, vocab: int):
    rows = max(1, DENSE_BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _dense_weights(z, stats, tie, temperature, valid):
    """softmax over S at temperature T, as a dense [rows, V] float32 (zero outside S)."""
    t_val = stats[:, 3:4]
    positions = torch.arange(z.shape[1], device=z.device)
    member = (z > t_val) | ((z == t_val) & (positions[None, :] <= tie[:, None])) | torch.isnan(z)
    member &= valid[:, None]
    weights = torch.exp((z - stats[:, 1:2]) / temperature) / stats[:, 2:3]
    return torch.where(member, weights, torch.zeros((), device=z.device))


def _float_table(embedding):
    return embedding if embedding.dtype == torch.float32 else embedding.float()


def _dense_forward(logits, labels, embedding, stats, tie, temperature, ignore_index):
    n, vocab = logits.shape
    table = _float_table(embedding)
    valid = labels != ignore_index
    mu = torch.zeros(n, embedding.shape[1], device=logits.device, dtype=torch.float32)
    for start, end in _dense_blocks(n, vocab):
        z = logits[start:end].float()
        w = _dense_weights(z, stats[start:end], tie[start:end], temperature, valid[start:end])
        mu[start:end] = w @ table
    e = table.index_select(0, torch.where(valid, labels, 0))
    dot = (mu * e).sum(1)
    norm_mu = mu.norm(dim=1)
    norm_e = e.norm(dim=1)
    cos = dot / (norm_mu.clamp_min(EPS) * norm_e.clamp_min(EPS))
    cos = torch.where(torch.isnan(stats[:, 0]), torch.full_like(cos, float("nan")), cos)
    cstats = torch.stack([cos, norm_mu, norm_e, dot], dim=1)
    cstats = torch.where(valid[:, None], cstats, torch.zeros((), device=cstats.device))
    return mu, cstats


def _row_coefficients(cstats):
    """a, b and d per row, as _direction_coefficients in backward.py: g = a e + b mu,
    d cos / d e = a mu + d e."""
    cos, norm_mu, norm_e = cstats[:, 0], cstats[:, 1], cstats[:, 2]
    nm_c, ne_c = norm_mu.clamp_min(EPS), norm_e.clamp_min(EPS)
    a = 1.0 / (nm_c * ne_c)
    zero = torch.zeros((), device=cstats.device)
    b = torch.where(norm_mu >= EPS, -cos / (nm_c * nm_c), zero)
    d = torch.where(norm_e >= EPS, -cos / (ne_c * ne_c), zero)
    return a, b, d


def _dense_backward(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, ignore_index,
                    need_logits_grad, want_demb, inplace=False, embedding_grad_out=None):
    """The dense path's backward; with ``embedding_grad_out`` (float32 [V, H]) the embedding
    gradient is added to it unrounded and None is returned for it."""
    stats, tie, _, _, mu, cstats = saved
    n, vocab = logits.shape
    device = logits.device
    table = _float_table(embedding)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    a, b, d = _row_coefficients(cstats)
    rows_used = valid & (grad_cos != 0)
    dlogits = (logits if inplace else torch.empty_like(logits)) if need_logits_grad else None
    dtable = torch.zeros(vocab, embedding.shape[1], device=device, dtype=torch.float32) if want_demb else None
    for start, end in _dense_blocks(n, vocab):
        rows = slice(start, end)
        z = logits[rows].float()
        w = _dense_weights(z, stats[rows], tie[rows], temperature, valid[rows])
        e = table.index_select(0, safe_labels[rows])
        # rows the cosine term does not reach contribute exactly nothing (their a, e may overflow)
        g = torch.where(rows_used[rows, None], a[rows, None] * e + b[rows, None] * mu[rows], 0.0)
        if need_logits_grad:
            s = g @ table.T
            # s_bar from the same rounded s it is subtracted from (backward.py's docstring)
            s_bar = (w * s).sum(1, keepdim=True)
            dz = torch.exp((z - stats[rows, 1:2]) - stats[rows, 0:1])
            dz[torch.arange(end - start, device=device), safe_labels[rows]] -= 1.0
            dz = grad_ce[rows, None] * dz + (grad_cos[rows, None] / temperature) * w * (s - s_bar)
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
        demb = _add_target_terms(embedding, labels, rows_used, t, dtable, out=embedding_grad_out)
    return dlogits, (None if embedding_grad_out is not None else demb)


def _add_target_terms(embedding, labels, rows_used, t, base, out=None):
    """base + the target entries' dE (rows of t summed per label, in row order), rounded once
    to E's dtype, or written to ``out`` (float32, may be ``base`` itself): the vocabulary pass
    with no S entries."""
    vocab, hidden = embedding.shape
    device = embedding.device
    t_rows, t_offsets = _target_segments(labels, rows_used, vocab)
    demb = torch.empty_like(embedding) if out is None else out
    chunk = min(_next_pow2(hidden), MAX_HIDDEN_CHUNK)
    vtiles = _vocab_tiles(chunk)
    for h0 in range(0, hidden, chunk):
        embedding_grad_kernel[(triton.cdiv(vocab, vtiles["VB"]),)](
            demb, base, embedding, _empty(device),
            _empty(device, torch.int32), _empty(device, torch.int32), _empty(device), 0, 0, 1, t_rows, t_offsets,
            _empty(device), t[:, h0:], hidden, _empty(device), _empty(device),
            vocab, hidden, h0, chunk, 1.0,
            FIRST=True, WRITE_S=False, WRITE_DE=True, HAS_BASE=True,
            VB=vtiles["VB"], BE=vtiles["BE"], BC=vtiles["BC"], num_warps=vtiles["NW"], maxnreg=vtiles["MAXNREG"],
        )
    return demb
