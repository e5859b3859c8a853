"""The state the forward saves for the backward, with named columns.

Per row, two ``[N, ROW_WIDTH]`` float32 tables: ``stats`` (written by the forward's row
kernel) and ``cstats`` (by the cosine kernel, or the dense path). Their columns are
``tl.constexpr`` globals, which kernels may read (triton rejects other globals, and a plain
``X: tl.constexpr = 0`` annotation too); kernels address a column with ``column``, host code
reads one with ``host_column``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

ROW_WIDTH = tl.constexpr(4)

# stats: everything relative to the row max, as log_softmax works; of the row z' the loss options make
# (transform.py; the logits themselves without a scale or cap): lse_n = max + log_sum
STAT_LOG_SUM = tl.constexpr(0)  # log sum_v exp(z'_v - max): the logsumexp less the max (NaN for a row with NaN)
STAT_MAX = tl.constexpr(1)  # max_v z'_v (-inf for a row of -inf)
STAT_S_SUM = tl.constexpr(2)  # sum over S of exp((z' - max) / T): the softmax normaliser over S
STAT_THRESHOLD = tl.constexpr(3)  # the smallest z' in S (with ``tie``: "v in S" as an elementwise test)

# cstats: the cosine term, without mu itself (the sparse backward recomputes it by chunks of H)
COS_VALUE = tl.constexpr(0)  # cos(mu, e)
COS_NORM_MU = tl.constexpr(1)  # |mu|
COS_NORM_E = tl.constexpr(2)  # |e|, e = E[label]
COS_DOT = tl.constexpr(3)  # mu . e


@triton.jit
def column(table_ptr, rows64, COLUMN: tl.constexpr):
    """Pointers to column COLUMN of the rows ``rows64`` (any shape) of a ``[N, ROW_WIDTH]`` table."""
    return table_ptr + rows64 * ROW_WIDTH + COLUMN


def host_column(table: torch.Tensor, column_index: tl.constexpr) -> torch.Tensor:
    """Column ``column_index`` (one of the constants above) of a ``[N, ROW_WIDTH]`` table, as ``[N]``."""
    return table[:, column_index.value]


class TritonSaved(NamedTuple):
    """The saved state of ``forward_rows`` (a tuple: autograd and the custom ops take it apart).

    Its arity, shapes and dtypes are versioned by ``SAVED_LAYOUTS["triton"]`` in compile_ops.py."""

    stats: torch.Tensor  # [N, ROW_WIDTH] float32, columns STAT_*
    tie: torch.Tensor  # [N] int32: the largest index taken into S among values equal to the threshold
    s_idx: torch.Tensor  # [N, k] S's vocabulary indices (index_dtype; [0] int32 off the sparse path)
    s_val: torch.Tensor  # [N, k] S's logits, in their dtype (not z': kernels transform them) ([0] off the sparse path)
    mu: torch.Tensor  # [N, H] float32 on the dense path, else [0, H]
    cstats: torch.Tensor  # [N, ROW_WIDTH] float32, columns COS_* ([0, ROW_WIDTH] without the cosine term)


def index_dtype(vocab: int) -> torch.dtype:
    """S's indices take 16 bits while the vocabulary fits (read back unsigned), else 32."""
    return torch.int16 if vocab <= 65536 else torch.int32
