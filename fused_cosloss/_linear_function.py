"""The autograd Functions of the fused-linear mode: the mixed loss from hidden states,
one chunk of logits at a time.

``LinearMixedLoss`` (the training path: a reduced loss, gradients wanted) computes the
gradients in the forward, as Liger-Kernel's fused linear cross-entropy does: the loss's
per-position coefficients are known there ((1 - alpha) on ce_n, -alpha on cos_n, times
1 / N_valid for the mean), so each chunk's logits gradient is written over the chunk's
logits in place, turned into the hidden / weight / bias gradients at once and dropped;
the backward only scales them by the incoming gradient. Nothing per position is kept.

``LinearMixedRows`` (per-position outputs, ``reduction="none"``, or no gradient) is the
general form described below.

For each chunk of rows, ``z = hidden[chunk] @ weight.T (+ bias)`` is computed into a
buffer reused by every chunk and handed to a kernel backend (the protocol of
``_kernel_function.py``; the reference takes part through ``_reference_ops.py``). The
forward keeps only what the backend saves per row, O(N * (K + H)); the backward
recomputes each chunk's logits, asks the backend for their gradient and turns it into
the gradients of hidden, weight and bias with three matmuls:

    d hidden[chunk] = dz @ weight,   d weight += dz.T @ hidden[chunk],   d bias += sum_rows dz

The embedding's gradient (the cosine term's) goes to ``weight`` when the embedding is
tied to it (``embedding is None``). ``weight`` and ``bias`` gradients accumulate in
float32 over the chunks, in chunk order, so the result does not change from run to run.

The backward's logits are recomputed by the same matmul on the same inputs; backends
that decide top-k membership from the saved threshold (Triton) rely on that matmul
giving the same bits twice, which BLAS libraries and cuBLAS do for identical calls.
"""
from __future__ import annotations

import torch


class LinearMixedLoss(torch.autograd.Function):
    """(loss, ce, cos, correct) from hidden states with the loss's gradients computed in the forward.

    ``ce`` and ``cos`` (per position) are outputs for the parts and metrics only: a gradient
    arriving through them is refused, since the forward computed the gradient of ``loss``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, embedding, labels, ops, temperature, k, ignore_index, with_cos, chunk,
                alpha, reduction):
        ctx.set_materialize_grads(False)
        table = weight if embedding is None else embedding
        n = hidden.shape[0]
        need_hidden, need_weight, need_bias, need_embedding = ctx.needs_input_grad[:4]
        tied = embedding is None
        need_table = (need_weight if tied else need_embedding) and with_cos
        need_logits = need_hidden or need_weight or need_bias
        ce, cos, correct = _row_outputs(hidden, n)
        coef_ce, coef_cos, scale = _loss_coefficients(labels, ignore_index, alpha, reduction, ce.dtype)

        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = _accumulator(weight) if need_weight else None
        d_bias = _accumulator(bias) if need_bias else None
        # without the cosine term the loss does not depend on an untied embedding: no gradient, as in mixed_loss
        d_embedding = _accumulator(embedding) if need_embedding and with_cos else None
        d_table = (d_weight if tied else d_embedding) if need_table else None
        buffer = _logits_buffer(hidden, weight, min(chunk, n))
        for start, end in _chunks(n, chunk):
            h, rows = hidden[start:end], slice(start, end)
            z = _chunk_logits(h, weight, bias, buffer)
            ce[rows], cos[rows], correct[rows], saved = ops.forward_rows(
                z, labels[rows], table, temperature, k, ignore_index, with_cos)
            if not (need_logits or need_table):
                continue
            # the chunk's gradient over its logits, the embedding's added to its accumulator
            dz, dtab = ops.backward_rows(
                z, labels[rows], table, saved, coef_ce[rows], coef_cos[rows], temperature, k, ignore_index,
                with_cos, need_logits, need_table, inplace=True, embedding_grad_out=_float32_or_none(d_table))
            if dtab is not None:  # a float64 accumulator: added here
                d_table += dtab
            if need_hidden:
                torch.mm(dz, weight, out=d_hidden[rows])
            if need_weight:
                _accumulate_mm(d_weight, dz.t(), h)
            if need_bias:
                d_bias += dz.sum(dim=0, dtype=d_bias.dtype)
        valid = labels != ignore_index
        loss_rows = alpha * torch.where(valid, 1.0 - cos, torch.zeros_like(cos)) + (1.0 - alpha) * ce
        loss = loss_rows.sum() * scale
        ctx.mark_non_differentiable(correct)
        ctx.gradients = (d_hidden, d_weight, d_bias, d_embedding)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias, embedding))
        return loss, ce, cos, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_cos, _grad_correct):
        if grad_ce is not None or grad_cos is not None:
            raise RuntimeError(
                "linear_mixed_loss: with reduction='mean' or 'sum' the gradient is computed in the forward for the "
                "loss only, so its .ce and .cos parts cannot be differentiated; use reduction='none' (and reduce "
                "the per-position values yourself) to differentiate the parts")
        gradients, ctx.gradients = ctx.gradients, None
        if grad_loss is None:
            return (None,) * 13
        scaled = tuple(None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(gradients, ctx.dtypes))
        return (*scaled, None, None, None, None, None, None, None, None, None)


def _loss_coefficients(labels, ignore_index, alpha, reduction, dtype):
    """Per-position d loss / d ce_n and d loss / d cos_n, and the reduction's scale (1 / N_valid for
    the mean, a tensor: no device sync)."""
    valid = labels != ignore_index
    if reduction == "mean":
        scale = 1.0 / valid.sum().clamp_min(1).to(dtype)
    else:
        scale = torch.ones((), device=labels.device, dtype=dtype)
    zero = torch.zeros((), device=labels.device, dtype=dtype)
    coef_ce = torch.where(valid, (1.0 - alpha) * scale, zero)
    coef_cos = torch.where(valid, -alpha * scale, zero)
    return coef_ce, coef_cos, scale


def _float32_or_none(accumulator):
    """The embedding accumulator where a backend can add into it (float32), else None."""
    return accumulator if accumulator is not None and accumulator.dtype == torch.float32 else None


class LinearMixedRows(torch.autograd.Function):
    """Per-position (ce, cos, correct) from ``hidden [N, H]``, ``weight [V, H]`` (and ``bias``,
    ``embedding``), differentiable in hidden, weight, bias and embedding."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, embedding, labels, ops, temperature, k, ignore_index, with_cos, chunk):
        table = weight if embedding is None else embedding
        n = hidden.shape[0]
        ce, cos, correct = _row_outputs(hidden, n)
        saved_chunks = []
        buffer = _logits_buffer(hidden, weight, min(chunk, n))
        for start, end in _chunks(n, chunk):
            z = _chunk_logits(hidden[start:end], weight, bias, buffer)
            ce_c, cos_c, correct_c, saved = ops.forward_rows(
                z, labels[start:end], table, temperature, k, ignore_index, with_cos)
            ce[start:end], cos[start:end], correct[start:end] = ce_c, cos_c, correct_c
            saved_chunks.append(saved)
        ctx.mark_non_differentiable(correct)
        ctx.chunk_sizes = [len(saved) for saved in saved_chunks]
        ctx.save_for_backward(hidden, weight, bias, embedding, labels, *[t for s in saved_chunks for t in s])
        ctx.options = (ops, temperature, k, ignore_index, with_cos, chunk)
        return ce, cos, correct

    @staticmethod
    def backward(ctx, grad_ce, grad_cos, _grad_correct):
        hidden, weight, bias, embedding, labels, *flat = ctx.saved_tensors
        ops, temperature, k, ignore_index, with_cos, chunk = ctx.options
        need_hidden, need_weight, need_bias, need_embedding = ctx.needs_input_grad[:4]
        tied = embedding is None
        table = weight if tied else embedding
        need_table = need_weight if tied else need_embedding
        need_logits = need_hidden or need_weight or need_bias
        grad_ce, grad_cos = grad_ce.contiguous(), grad_cos.contiguous()

        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = _accumulator(weight) if need_weight else None
        d_bias = _accumulator(bias) if need_bias else None
        d_embedding = _accumulator(embedding) if need_embedding and with_cos else None
        d_table = d_weight if tied else d_embedding
        buffer = _logits_buffer(hidden, weight, min(chunk, hidden.shape[0]))
        for (start, end), saved in zip(_chunks(hidden.shape[0], chunk), _unflatten(flat, ctx.chunk_sizes)):
            h = hidden[start:end]
            z = _chunk_logits(h, weight, bias, buffer)
            dz, dtab = ops.backward_rows(
                z, labels[start:end], table, tuple(saved), grad_ce[start:end], grad_cos[start:end],
                temperature, k, ignore_index, with_cos, need_logits, need_table)
            if need_hidden:
                torch.mm(dz, weight, out=d_hidden[start:end])
            if need_weight:
                _accumulate_mm(d_weight, dz.t(), h)
            if need_bias:
                d_bias += dz.sum(dim=0, dtype=d_bias.dtype)
            if dtab is not None:
                d_table += dtab
        return (d_hidden, _cast(d_weight, weight), _cast(d_bias, bias), _cast(d_embedding, embedding),
                None, None, None, None, None, None, None)


def _chunks(n: int, chunk: int):
    """(start, end) of consecutive row chunks covering [0, n)."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _row_outputs(hidden, n):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce = torch.zeros(n, device=hidden.device, dtype=dtype)
    return ce, torch.zeros_like(ce), torch.zeros(n, device=hidden.device, dtype=torch.bool)


def _logits_buffer(hidden, weight, rows):
    """One chunk's logits, reused by every chunk (a fresh allocation per chunk costs page faults on CPU)."""
    return torch.empty(rows, weight.shape[0], device=hidden.device, dtype=hidden.dtype)


def _chunk_logits(h, weight, bias, buffer):
    """h @ weight.T (+ bias) into the first rows of ``buffer``."""
    out = buffer[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _accumulator(like):
    """A zero float32 (float64 for float64) accumulator of ``like``'s shape."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.zeros(like.shape, device=like.device, dtype=dtype)


def _accumulate_mm(acc, a, b):
    """acc += a @ b, in one addmm when the dtypes agree (else the product is rounded to a's dtype first)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)


def _cast(acc, like):
    return None if acc is None else acc.to(like.dtype)


def _unflatten(flat, sizes):
    start = 0
    for size in sizes:
        yield flat[start:start + size]
        start += size
