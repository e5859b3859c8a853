"""Launch geometry: tile sizes, program counts and register caps of the kernels, from ``CONFIG``.

On a GPU a program takes one row per step (BR = 1, the natural mapping); under the
interpreter, whose cost is per operation rather than per element, blocks of rows
(``CONFIG.interpreter_tiles``). The register counts of the GPU's tiles (no spills) are
checked by tests/test_triton_compile.py.
"""
from __future__ import annotations

import torch

from .config import CONFIG

# The row kernel's modes (its MODE): cross-entropy alone, the sparse path's selection of S, and the
# dense path's threshold of S over the whole row (k > CONFIG.sparse_max_k).
CE_ONLY, SPARSE, DENSE = 0, 1, 2


def interpreted() -> bool:
    """Whether this package's kernels were built for the triton interpreter (TRITON_INTERPRET=1
    when triton decorated them). Asks a helper no launcher wraps (bench/stages.py wraps the kernels)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .select import sort_key

    return isinstance(sort_key, InterpretedFunction)


def interpreter_blocks() -> bool:
    """Whether the kernels take the interpreter's blocks of rows rather than the GPU's tiles."""
    return CONFIG.interpreter_tiles and interpreted()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_programs(n_blocks: int, device: torch.device) -> int:
    """Programs of the persistent row kernel: ``CONFIG.programs_per_sm`` per SM on a GPU."""
    if device.type == "cuda" and not interpreted():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, CONFIG.programs_per_sm * sms))
    return max(1, min(n_blocks, 2))


def rows_per_step(n: int) -> int:
    """BR: rows a program takes at a time (every row kernel)."""
    return min(16, next_pow2(n)) if interpreter_blocks() else 1


def gather_tiles(n: int, k: int, hidden: int) -> dict:
    """BR, BK (entries of S) and BH (columns of H) of the kernels that gather E's rows over S."""
    if interpreter_blocks():
        return dict(BR=rows_per_step(n), BK=min(256, max(16, next_pow2(k))), BH=min(64, max(16, next_pow2(hidden))))
    return dict(BR=rows_per_step(n), BK=8, BH=hidden_block(hidden, 256))


def hidden_block(hidden: int, cap: int) -> int:
    return min(cap, max(16, next_pow2(hidden)))


def selected_block(k: int) -> int:
    """Entries of S per step of selected_grad_kernel: the whole of S up to 1024 on a GPU (one
    row per program), 64 under the interpreter's blocks of rows."""
    return min(64 if interpreter_blocks() else 1024, max(16, next_pow2(k)))


def vocab_tiles(chunk: int) -> dict:
    """The vocabulary pass holds a chunk of embedding row (BC >= C columns) and BE entries of a
    segment at a time, for VB vocabulary rows; NW warps, MAXNREG registers."""
    padded = max(16, next_pow2(chunk))
    if interpreter_blocks():
        return dict(VB=64, BE=8, BC=padded, NW=4, MAXNREG=None)
    return dict(VB=1, BE=max(1, min(8, 2048 // padded)), BC=padded, NW=8, MAXNREG=CONFIG.vocab_pass_maxnreg)


def row_block(vocab: int) -> int:
    """Lanes of the row kernels' blocks (see row_kernel_lanes for the forward's sparse mode)."""
    return min(CONFIG.row_lanes, max(16, next_pow2(vocab)))


def row_kernel_lanes(vocab: int, k: int, mode: int, heavy_options: bool = False) -> int:
    """BV of the forward row kernel: the selection's lane bound needs at least k lanes. ``heavy_options``
    (a soft-cap or label smoothing on): fewer lanes in the CE-only mode (CONFIG.option_row_lanes)."""
    if mode == SPARSE:
        return max(min(CONFIG.sparse_row_lanes, row_block(vocab)), next_pow2(k))
    return gradient_pass_lanes(vocab, mode, heavy_options)


def gradient_pass_lanes(vocab: int, mode: int, heavy_options: bool = False) -> int:
    """BG: lanes of the forward row kernel's gradient pass (see row_kernel_lanes for ``heavy_options``)."""
    if heavy_options and mode == CE_ONLY:
        return min(CONFIG.option_row_lanes, row_block(vocab))
    return row_block(vocab)


def cosine_options(transforms: bool) -> dict:
    """Launch options (num_warps, maxnreg) of the cosine kernel, with or without a logit scale or soft-cap."""
    return dict(num_warps=CONFIG.cosine_warps, maxnreg=CONFIG.cosine_option_maxnreg if transforms else None)


def row_kernel_options(dtype: torch.dtype, mode: int) -> dict:
    """Launch options (num_warps, maxnreg) of the forward row kernel for logits of this dtype in this mode."""
    maxnreg = {CE_ONLY: None, SPARSE: CONFIG.sparse_row_maxnreg[dtype], DENSE: CONFIG.dense_row_maxnreg}[mode]
    return dict(num_warps=CONFIG.row_warps, maxnreg=maxnreg)


def candidate_capacity(k: int) -> int:
    """Candidates the selection's scratch holds per row."""
    return CONFIG.candidate_capacity if CONFIG.candidate_capacity is not None else max(4 * k, 2048)


def scratch_block(capacity: int) -> int:
    return min(1024, max(16, next_pow2(capacity)))


def key_constants(dtype: torch.dtype):
    """(16-bit keys, radix passes): 16-bit dtypes are resolved in two 8-bit passes, float32 in four."""
    key16 = dtype != torch.float32
    return key16, 2 if key16 else 4


def hidden_chunk(vocab: int, hidden: int, logits_itemsize: int) -> int:
    """Columns of H per chunk of the backward: a power of two from 32 to CONFIG.max_hidden_chunk,
    so that its two float32 [N, C] buffers take at most CONFIG.hidden_chunk_share of the logits' bytes."""
    if CONFIG.hidden_chunk is not None:
        return CONFIG.hidden_chunk
    budget = int(vocab * logits_itemsize * CONFIG.hidden_chunk_share) // 8
    return min(next_pow2(hidden), CONFIG.max_hidden_chunk, 1 << max(5, budget.bit_length() - 1))
