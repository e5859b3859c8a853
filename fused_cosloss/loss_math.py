"""The loss assembled from its per-position terms: the mixed rows, their reduction, and the
per-position coefficients the autograd Functions that compute the gradient in the forward use."""
from __future__ import annotations

import torch


def loss_rows(ce_rows, cos_rows, valid, alpha):
    """(1 - cos_n, alpha * (1 - cos_n) + (1 - alpha) * ce_n) per position, 0 distance where ignored."""
    dist_rows = torch.where(valid, 1.0 - cos_rows, torch.zeros_like(cos_rows))
    return dist_rows, alpha * dist_rows + (1.0 - alpha) * ce_rows


def loss_coefficients(valid, alpha, reduction, dtype):
    """Per-position d loss / d ce_n and d loss / d cos_n, and the reduction's scale (1 / N_valid for
    the mean, a tensor: no device sync)."""
    if reduction == "mean":
        scale = 1.0 / valid.sum().clamp_min(1).to(dtype)
    else:
        scale = torch.ones((), device=valid.device, dtype=dtype)
    zero = torch.zeros((), device=valid.device, dtype=dtype)
    coef_ce = torch.where(valid, (1.0 - alpha) * scale, zero)
    coef_cos = torch.where(valid, -alpha * scale, zero)
    return coef_ce, coef_cos, scale


def reduced_loss(ce_rows, cos_rows, valid, alpha, scale):
    """The loss whose per-position coefficients ``loss_coefficients`` gave: the mixed rows summed,
    times the reduction's ``scale``."""
    return loss_rows(ce_rows, cos_rows, valid, alpha)[1].sum() * scale


def reduce_positions(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str, shape, shift: bool) -> torch.Tensor:
    """Reduce per-position values; ``"none"`` keeps the labels' shape (less the last position when shifted)."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / n_valid.clamp_min(1).to(rows.dtype)
    per_position = rows.reshape(shape)
    return per_position[..., :-1] if shift else per_position
