"""Host-side grouping for the vocabulary pass (embedding_grad.py): S's entries grouped by
vocabulary row, and the rows grouped by label, with torch.sort."""
from __future__ import annotations

import torch
import triton

from .config import CONFIG


def grouped_entries(s_idx, rows_used, vocab):
    """The entries (n, v in S_n) of the rows ``rows_used``, grouped by v: pieces of
    ``piece_rows`` consecutive rows, each sorted by (v, n) into its range of ``entries``
    (positions n * k + j in S's [N, k] buffers; int32, int64 past 2**31) with its own offsets
    ``[pieces, V + 1]`` (int32, within the piece). -> (entries, offsets, pieces, piece_len).
    Sorting piece by piece (``CONFIG.piece_entries`` entries) keeps the sort's temporaries to
    those of one piece; keys v * piece_rows + local row fit in int32."""
    n, k = s_idx.shape
    device = s_idx.device
    piece_rows = max(1, min(n, CONFIG.piece_entries // max(k, 1), (2 ** 31 - 1) // (vocab + 1)))
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


def target_segments(labels, rows_used, vocab):
    """Rows grouped by label, in row order (``t_rows`` int64), and each label's segment
    ``t_offsets[y] : t_offsets[y + 1]``; rows not used go past the last segment."""
    keys = torch.where(rows_used, labels, vocab)
    sorted_keys, t_rows = torch.sort(keys, stable=True)
    t_offsets = torch.searchsorted(sorted_keys, torch.arange(vocab + 1, device=labels.device, dtype=keys.dtype))
    return t_rows, t_offsets
