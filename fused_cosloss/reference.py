"""The pure-PyTorch reference: the oracle for every backend and the fallback where none runs.

It computes docs/spec.md literally with differentiable PyTorch ops, in float32 (float64 stays
float64, and autocast is turned off inside), on any device. It never builds an ``[N, K, H]``
gather (the expected embedding is an ``embedding_bag`` weighted sum) nor a softmax copy of
the logits, except when the top-k covers the whole vocabulary, where the expected embedding
is a dense ``softmax(z / T) @ E`` (``N * V`` extra floats), and except in a backward that
builds a graph itself (``create_graph=True``): there the weighted sum is differentiated
through an ``[N, K, H]`` gather, since ``embedding_bag``'s own backward cannot be.
Every softmax and log-sum-exp works relative to the row's maximum, so that ce and the
gradients keep their precision however large the logits are.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .options import LossOptions

EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def select_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row; at the k-th value the lower index wins.

    ``torch.topk`` breaks ties in no documented order, so rows where the k-th value also
    occurs outside the chosen set are redone with a stable descending sort.
    """
    if torch.compiler.is_compiling():
        return _select_topk_traceable(z, k)
    idx = torch.topk(z, k, dim=-1).indices
    kth = z.gather(1, idx).amin(dim=-1, keepdim=True)
    ambiguous = (z >= kth).sum(dim=-1) > k
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        stable = torch.sort(z.index_select(0, rows), dim=-1, descending=True, stable=True).indices
        idx[rows] = stable[:, :k]
    return idx


def _select_topk_traceable(z: torch.Tensor, k: int) -> torch.Tensor:
    """``select_topk`` without a host sync or a data-dependent branch (the traced path).

    S is every entry above the k-th value plus, at the k-th value, the lowest indices
    (counted with a cumulative sum) to make k: exactly k members per row, whose indices
    are then those of the k ones of the membership mask (their order does not matter).
    A NaN counts as the largest value, as in ``torch.topk``.
    """
    kth = torch.topk(z, k, dim=-1).values[:, -1:]
    above = (z > kth) | torch.isnan(z)
    at = z == kth
    room = k - above.sum(dim=-1, keepdim=True)
    member = above | (at & (torch.cumsum(at.to(torch.int32), dim=-1) <= room))
    return torch.topk(member.to(z.dtype), k, dim=-1).indices


def expected_embedding(z: torch.Tensor, embedding: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """mu_n = sum over the top-k of row n of softmax(z[S] / T)_i * E[i], shape [N, H]."""
    traced = torch.compiler.is_compiling()  # the plain ops there: the graph is differentiated by AOTAutograd
    if k >= z.shape[-1]:
        weights = tempered_softmax(z, temperature)
        return weights @ embedding if traced else Float32MatMul.apply(weights, embedding)
    idx = select_topk(z, k)
    weights = tempered_softmax(z.gather(1, idx), temperature)
    if traced:
        return F.embedding_bag(idx, embedding, per_sample_weights=weights, mode="sum")
    return WeightedRowSum.apply(idx, embedding, weights)


class Float32MatMul(torch.autograd.Function):
    """``a @ b`` with autocast off in the forward and in the backward: a backward run inside an
    autocast region (``loss.backward()`` under ``torch.autocast``) would otherwise compute the
    gradients' matrix products in bfloat16/float16. Differentiable again (its backward is made of
    matrix products)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with autocast_off(a.device):
            return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        with autocast_off(grad.device):
            da = grad @ b.transpose(0, 1) if ctx.needs_input_grad[0] else None
            db = a.transpose(0, 1) @ grad if ctx.needs_input_grad[1] else None
        return da, db


class WeightedRowSum(torch.autograd.Function):
    """``out[n] = sum_k weights[n, k] * table[idx[n, k]]`` ([N, H]), computed and differentiated
    by ``embedding_bag``'s kernels (no ``[N, K, H]`` gather), and differentiable again.

    ``embedding_bag``'s backward has no derivative, so a backward that must build a graph
    (``create_graph=True``: grad mode is on inside it) expresses the same gradients with
    differentiable ops instead, gathering ``[N, K, H]`` rows of the table for that call only."""

    @staticmethod
    def forward(ctx, idx, table, weights):
        n, k = idx.shape
        flat_idx = idx.reshape(-1)
        offsets = torch.arange(0, n * k, k, device=idx.device, dtype=idx.dtype)
        out, offset2bag, bag_size, max_indices = torch.ops.aten._embedding_bag(
            table, flat_idx, offsets, False, 0, False, weights.reshape(-1))
        ctx.save_for_backward(idx, table, weights, offsets, offset2bag, bag_size, max_indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, table, weights, offsets, offset2bag, bag_size, max_indices = ctx.saved_tensors
        need_table, need_weights = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if torch.is_grad_enabled():
            d_table, d_weights = _weighted_row_sum_grads_differentiable(idx, table, weights, grad_out)
            return None, d_table if need_table else None, d_weights if need_weights else None
        grad_out = grad_out.contiguous()
        flat_idx, flat_weights = idx.reshape(-1), weights.reshape(-1)
        d_table = d_weights = None
        if need_table:
            d_table = torch.ops.aten._embedding_bag_backward(
                grad_out, flat_idx, offsets, offset2bag, bag_size, max_indices, table.shape[0], False, 0, False,
                flat_weights)
        if need_weights:
            d_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, table, flat_idx, offsets, offset2bag, 0).reshape(weights.shape)
        return None, d_table, d_weights


def _weighted_row_sum_grads_differentiable(idx, table, weights, grad_out):
    """(d table, d weights) of ``WeightedRowSum`` as a graph of differentiable ops."""
    hidden = table.shape[1]
    contributions = (weights[:, :, None] * grad_out[:, None, :]).reshape(-1, hidden)
    d_table = torch.zeros_like(table).index_add(0, idx.reshape(-1), contributions)
    d_weights = (table[idx] * grad_out[:, None, :]).sum(dim=-1)
    return d_table, d_weights


def tempered_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) over the last dim, computed as softmax((z - max z) / T).

    Subtracting the max before dividing keeps the rounding error of each exponent at
    eps * |z_i - max z| / T rather than eps * |z_i| / T, which matters at small T."""
    return torch.softmax((z - z.amax(dim=-1, keepdim=True).detach()) / temperature, dim=-1)


def cross_entropy(z: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """(ce_n, lse_n): ce_n = log sum_v exp(z_nv - m_n) - (z_n[y_n] - m_n), m_n the row's maximum,
    and lse_n = m_n + log sum_v exp(z_nv - m_n).

    Relative to the maximum, as ``log_softmax`` is: ``logsumexp(z) - z_y`` would round the
    log-sum-exp to the precision of |z| first (1e30 + log 2 == 1e30 in float32), and that
    rounding would reach ce and its gradient. An infinite maximum shifts by 0, as
    ``torch.logsumexp`` does. With ``label_smoothing`` epsilon > 0, ce_n is
    ``log_sum - (1 - epsilon) (z_y - m) - epsilon (mean_v z_v - m)``, the cross-entropy of
    ``F.cross_entropy(label_smoothing=epsilon)`` (the term is left out, not multiplied by 0,
    when epsilon = 0)."""
    m = z.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    shifted = z - m
    log_sum = torch.logsumexp(shifted, dim=-1)
    target = shifted.gather(1, y[:, None]).squeeze(1)
    if label_smoothing:
        ce = log_sum - (1.0 - label_smoothing) * target - label_smoothing * shifted.mean(dim=-1)
    else:
        ce = log_sum - target
    return ce, log_sum + m.squeeze(1)


def transformed_logits(z: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The row every term is computed from: ``c * tanh(s * z / c)`` (docs/spec.md, "Loss options");
    ``z`` itself when neither option is on."""
    if options.logit_scale != 1.0:
        z = z * options.logit_scale
    if options.softcap is not None:
        z = options.softcap * torch.tanh(z / options.softcap)
    return z


def cosine(mu: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(mu . e) / (max(|mu|, eps) * max(|e|, eps)) per row."""
    dot = (mu * e).sum(dim=-1)
    return dot / (mu.norm(dim=-1).clamp_min(EPS) * e.norm(dim=-1).clamp_min(EPS))


def reference_rows(logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, options: LossOptions):
    """Per-position statistics of the mixed loss.

    Args:
        logits: ``[N, V]`` floating. labels: ``[N]`` integer. embedding: ``[V, H]``.
        options: the resolved :class:`~fused_cosloss.options.LossOptions` (``k >= V``: the whole
            vocabulary; ``with_cos=False`` skips the cosine term, whose rows are then zero).

    Returns:
        ``(ce, cos, correct, lse)``, each ``[N]``: ce_n and cos_n in the compute dtype, zero at
        ignored positions, whether argmax(z'_n) == y_n, and lse_n, the log-sum-exp of the
        transformed row z'_n (zero at ignored positions).
    """
    with autocast_off(logits.device):
        return _reference_rows(logits, labels, embedding, options)


def autocast_off(device: torch.device):
    """A context where autocast does not lower the precision of ops on ``device`` (the loss is
    computed in float32 whatever the caller's autocast says, as the kernels compute it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _reference_rows(logits, labels, embedding, options: LossOptions):
    """``reference_rows`` with autocast off."""
    dtype = compute_dtype(logits.dtype)
    n = logits.shape[0]
    if torch.compiler.is_compiling():
        return _reference_rows_traceable(logits, labels, embedding, options, dtype)
    rows = (labels != options.ignore_index).nonzero().squeeze(1)
    # Ignored rows are left out (their logits may be anything, NaN included, and get exact
    # zero gradients); when every row is valid the logits are used without a copy.
    all_valid = rows.numel() == n
    z = transformed_logits((logits if all_valid else logits.index_select(0, rows)).to(dtype), options)
    y = (labels if all_valid else labels.index_select(0, rows)).long()

    ce, lse = cross_entropy(z, y, options.label_smoothing)
    correct = z.argmax(dim=-1) == y
    if options.with_cos:
        table = embedding.to(dtype)
        cos = cosine(expected_embedding(z, table, options.temperature, options.k), table.index_select(0, y))
    else:
        cos = torch.zeros_like(ce)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values if all_valid else values.new_zeros(n).index_copy(0, rows, values)

    return scatter(ce), scatter(cos), scatter(correct), scatter(lse)


def _reference_rows_traceable(logits, labels, embedding, options: LossOptions, dtype):
    """``reference_rows`` with static shapes (the traced path): ignored rows are masked to
    zero logits and label 0 instead of being left out (so NaN in them stays out, and their
    gradients are exact zeros through ``torch.where``), and their results are zeroed."""
    valid = labels != options.ignore_index
    zero = torch.zeros((), device=logits.device, dtype=dtype)
    z = transformed_logits(torch.where(valid[:, None], logits.to(dtype), zero), options)
    y = torch.where(valid, labels.long(), torch.zeros_like(labels, dtype=torch.long))

    ce, lse = cross_entropy(z, y, options.label_smoothing)
    correct = (z.argmax(dim=-1) == y) & valid
    if options.with_cos:
        table = embedding.to(dtype)
        cos = cosine(expected_embedding(z, table, options.temperature, options.k), table.index_select(0, y))
        cos = torch.where(valid, cos, zero)
    else:
        cos = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), cos, correct, torch.where(valid, lse, zero)
