"""The loss assembled from its per-position terms: the weighted mixed rows, their reduction, and
the per-position coefficients the autograd Functions that compute the gradient in the forward use
(docs/spec.md, "Loss options": loss_n = w_n (alpha (1 - cos_n) + (1 - alpha) ce_n + zeta lse_n^2))."""
from __future__ import annotations

from typing import NamedTuple

import torch


class WeightedRows(NamedTuple):
    """Per position, each weighted by w_n and zero where ignored: the cross-entropy, the cosine
    distance 1 - cos_n, the z-loss zeta * lse_n^2, and the mixed loss_n they add up to."""

    ce: torch.Tensor
    dist: torch.Tensor
    z_loss: torch.Tensor
    loss: torch.Tensor


def effective_weight(valid: torch.Tensor, weight: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """w_n at valid positions and 0 elsewhere (None without weights: every valid position weighs 1)."""
    if weight is None:
        return None
    return torch.where(valid, weight.to(dtype), torch.zeros((), device=weight.device, dtype=dtype))


def loss_rows(ce_rows, cos_rows, lse_rows, valid, alpha, *, z_loss=0.0, weight=None) -> WeightedRows:
    """The weighted per-position terms (``weight``: the effective weight, see ``effective_weight``):
    products, as the definition writes them, so that the weight's own gradient is each term (a
    weight of 0 times an infinite term is NaN there, as in the definition: ignore such a position
    with ``ignore_index`` instead)."""
    zero = torch.zeros_like(cos_rows)
    dist = torch.where(valid, 1.0 - cos_rows, zero)
    ce = ce_rows
    z_part = torch.where(valid, z_loss * lse_rows.square(), zero) if z_loss else zero
    if weight is not None:
        ce, dist = weight * ce, weight * dist
        if z_loss:
            z_part = weight * z_part
    mixed = alpha * dist + (1.0 - alpha) * ce
    if z_loss:
        mixed = mixed + z_part
    return WeightedRows(ce, dist, z_part, mixed)


def mean_divisor(valid: torch.Tensor, weight: torch.Tensor | None, dtype) -> torch.Tensor:
    """What ``"mean"`` divides by: N_valid, or the sum W of the valid positions' weights; 1 when
    that is 0 (the sum is then 0 too: the loss is 0, never NaN). A tensor: no device sync."""
    if weight is None:
        return valid.sum().clamp_min(1).to(dtype)
    total = weight.sum()
    return torch.where(total == 0, torch.ones_like(total), total)


def loss_coefficients(valid, alpha, reduction, dtype, *, weight=None, z_loss=0.0):
    """Per-position d loss / d ce_n, d loss / d cos_n, d loss / d lse_n^2 (None without z-loss), and
    the reduction's scale (1 / the mean's divisor, or 1; ``weight``: the effective weight)."""
    if reduction == "mean":
        scale = 1.0 / mean_divisor(valid, weight, dtype)
    else:
        scale = torch.ones((), device=valid.device, dtype=dtype)
    zero = torch.zeros((), device=valid.device, dtype=dtype)
    if weight is None:
        coef_ce = torch.where(valid, (1.0 - alpha) * scale, zero)
        coef_cos = torch.where(valid, -alpha * scale, zero)
        coef_lse_square = torch.where(valid, z_loss * scale, zero) if z_loss else None
    else:
        weight = weight.to(dtype)
        coef_ce = (1.0 - alpha) * scale * weight
        coef_cos = -alpha * scale * weight
        coef_lse_square = z_loss * scale * weight if z_loss else None
    return coef_ce, coef_cos, coef_lse_square, scale


def reduced_loss(ce_rows, cos_rows, lse_rows, valid, alpha, scale, *, z_loss=0.0, weight=None):
    """The loss whose per-position coefficients ``loss_coefficients`` gave: the weighted mixed
    rows summed, times the reduction's ``scale``."""
    return loss_rows(ce_rows, cos_rows, lse_rows, valid, alpha, z_loss=z_loss, weight=weight).loss.sum() * scale


def reduce_positions(rows: torch.Tensor, divisor: torch.Tensor, reduction: str, shape, shift: bool) -> torch.Tensor:
    """Reduce per-position values (``divisor``: ``mean_divisor``); ``"none"`` keeps the labels' shape
    (less the last position when shifted)."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / divisor.to(rows.dtype)
    per_position = rows.reshape(shape)
    return per_position[..., :-1] if shift else per_position
