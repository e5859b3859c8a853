"""The Triton backend's tuning knobs, in one object: ``CONFIG``.

The launchers and the tile heuristics (``tiles.py``) read ``CONFIG`` at every launch, so a
change takes effect at the next call. Change a knob for a while with ``override``
(``with override(sparse_max_k=4): ...``, restored on exit), or in a test with pytest's
``monkeypatch.setattr(CONFIG, "sparse_max_k", 4)``.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def _sparse_row_maxnreg() -> dict:
    return {torch.float32: 168, torch.bfloat16: 128, torch.float16: 128}


@dataclasses.dataclass
class TritonConfig:
    """Every tuning knob of the Triton backend (the defaults are the GPU's configuration)."""

    # Largest k on the sparse path; a larger k (topk=None on a real vocabulary) takes the dense path.
    sparse_max_k: int = 1024
    # Capacity of the per-program candidate scratch of the selection (None: max(4 * k, 2048)).
    # A row with more candidates than this falls back to a radix select over the whole row.
    candidate_capacity: int | None = None
    # Entries of S sorted per piece of consecutive rows (the sort's temporaries are those of one piece).
    piece_entries: int = 1 << 18
    # Columns of H per chunk of the backward (None: from hidden_chunk_share below).
    hidden_chunk: int | None = None
    # The backward's two float32 [N, C] chunk buffers take at most this share of the logits' bytes.
    hidden_chunk_share: float = 1 / 64
    # The vocabulary pass holds a chunk of an embedding row in registers: at 1024 columns it spills
    # 8 bytes on sm_80 with triton 3.6 (tests/test_triton_compile.py).
    max_hidden_chunk: int = 512
    # Dense path: rows per block chosen so that a [rows, V] float32 temporary has at most this many elements.
    dense_block_elements: int = 1 << 22
    # Persistent row-kernel programs per SM: rows in flight re-read from L2 in the selection's second
    # pass (2 per SM x 132 SMs x ~100 KB per bfloat16 row of 50257 stays well inside an H100's 50 MB L2).
    programs_per_sm: int = 2
    # Under the interpreter the kernels take blocks of rows (its cost is per operation); False makes
    # them take the GPU's tiles there too (slow: for a test of the GPU configuration's code paths).
    interpreter_tiles: bool = True
    # Warps per program: the row kernels (forward's row_stats_kernel), the kernels over S's entries
    # of a row (cosine, direction chunk, selected gradient) and the backward's row kernel.
    row_warps: int = 8
    cosine_warps: int = 4
    backward_warps: int = 8
    # Register cap of the row kernel's dense mode (k > sparse_max_k): left to ptxas it stays near
    # 80 registers on sm_80 and spills (triton 3.9); the dense path is the slow path, so it may
    # take the registers it needs at one program per SM.
    dense_row_maxnreg: int = 255
    # The sparse row kernel at 8 warps, with its register cap made explicit: left to ptxas, the cap
    # for two programs per SM (128) spilled 8-16 bytes with triton 3.7 (bf16 logits), and 3.8 held
    # it at 64 registers with the gradient pass and spilled 8 bytes on sm_80. float32 logits take
    # four radix passes instead of two and need more: at 168 registers (one program per SM) no
    # version from 3.6 to 3.9 spills; at 16 warps and 128, 3.6 spilled 8 bytes with the gradient pass.
    sparse_row_maxnreg: dict = dataclasses.field(default_factory=_sparse_row_maxnreg)
    # Lanes of the forward row kernel in its sparse mode. At 2048 lanes the kernel wants more than
    # the 128 registers ptxas gives a 256-thread program (8 warps) and spills with triton 3.6
    # (40-72 bytes); at 1024 it takes 113-128 registers there and 76-78 with triton 3.9, no spill
    # (tests/test_triton_compile.py). The lane bound then comes from 1024 lane maxima: about
    # -1024 ln(1 - 256/1024) = 295 candidates at K = 256 instead of 273.
    sparse_row_lanes: int = 1024
    # Lanes of the forward row kernel's CE-only mode (pass 0 and its gradient pass) when a soft-cap or label
    # smoothing is on (each lane's tanh, the smoothing's per-lane sum): at 2048 lanes that kernel, with the
    # gradient pass and every option on, spilled 32 bytes on sm_80 with triton 3.6 (tests/test_triton_compile.py).
    option_row_lanes: int = 1024
    # Register cap of the cosine kernel with a logit scale or soft-cap: left to ptxas it held 80 registers and
    # spilled 8 bytes on sm_90 with triton 3.6. Without them the kernel is left to ptxas, as before.
    cosine_option_maxnreg: int = 128
    # Lanes of the other row kernels' blocks (the forward's CE-only and dense modes, its gradient
    # pass, the backward's row kernel): at most this many, fewer for a shorter row.
    row_lanes: int = 2048
    # Register cap of the vocabulary pass on a GPU: left alone, ptxas holds it at 80 registers and
    # spills 8 bytes at C = 512 (sm_80, triton 3.9).
    vocab_pass_maxnreg: int = 128


CONFIG = TritonConfig()


@contextlib.contextmanager
def override(**knobs):
    """Sets these fields of ``CONFIG`` (a TypeError names an unknown one) for the ``with`` block."""
    names = {field.name for field in dataclasses.fields(TritonConfig)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"override: unknown Triton knob(s) {unknown}; expected some of {sorted(names)}")
    previous = {name: getattr(CONFIG, name) for name in knobs}
    for name, value in knobs.items():
        setattr(CONFIG, name, value)
    try:
        yield CONFIG
    finally:
        for name, value in previous.items():
            setattr(CONFIG, name, value)
