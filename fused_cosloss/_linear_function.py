"""The autograd Functions of the fused-linear mode: the mixed loss from hidden states,
one chunk of logits at a time.

``LinearMixedLoss`` (the training path: a reduced loss, gradients wanted) computes the
gradients in the forward, as Liger-Kernel's fused linear cross-entropy does: the loss's
per-position coefficients are known there ((1 - alpha) on ce_n, -alpha on cos_n, times
1 / N_valid for the mean), so each chunk's logits gradient is written over the chunk's
logits in place (by the Triton row kernel in the pass that reads them: ``forward_backward``),
turned into the hidden / weight / bias gradients at once and dropped;
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

from ._kernel_function import forward_backward
from ._loss_terms import loss_coefficients, reduced_loss


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
        grads = _Gradients(hidden, weight, bias, embedding, ctx.needs_input_grad[:4], with_cos)
        ce, cos, correct = _row_outputs(hidden, n)
        valid = labels != ignore_index
        coef_ce, coef_cos, scale = loss_coefficients(valid, alpha, reduction, ce.dtype)
        buffer = _logits_buffer(hidden, weight, min(chunk, n))
        for start, end in _chunks(n, chunk):
            h, rows = hidden[start:end], slice(start, end)
            z = _chunk_logits(h, weight, bias, buffer)
            if not (grads.need_logits or grads.need_table):
                ce[rows], cos[rows], correct[rows], _ = ops.forward_rows(
                    z, labels[rows], table, temperature, k, ignore_index, with_cos)
                continue
            # the chunk's gradient over its logits, the embedding's added to its accumulator
            ce[rows], cos[rows], correct[rows], dz, dtab = forward_backward(ops)(
                z, labels[rows], table, temperature, k, ignore_index, with_cos, coef_ce[rows], coef_cos[rows],
                grads.need_logits, grads.need_table, inplace=True, embedding_grad_out=grads.float32_table())
            grads.add_chunk(dz, dtab, h, weight, rows)
        loss = reduced_loss(ce, cos, valid, alpha, scale)
        ctx.mark_non_differentiable(correct)
        ctx.gradients = grads
        return loss, ce, cos, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_cos, _grad_correct):
        if grad_ce is not None or grad_cos is not None:
            raise RuntimeError(
                "linear_mixed_loss: with reduction='mean' or 'sum' the gradient is computed in the forward for the "
                "loss only, so its .ce and .cos parts cannot be differentiated; use reduction='none' (and reduce "
                "the per-position values yourself) to differentiate the parts")
        grads, ctx.gradients = ctx.gradients, None
        if grad_loss is None:
            return (None,) * 13
        return (*grads.in_input_dtypes(grad_loss), None, None, None, None, None, None, None, None, None)


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
        table = weight if embedding is None else embedding
        grads = _Gradients(hidden, weight, bias, embedding, ctx.needs_input_grad[:4], with_cos)
        grad_ce, grad_cos = grad_ce.contiguous(), grad_cos.contiguous()
        buffer = _logits_buffer(hidden, weight, min(chunk, hidden.shape[0]))
        for (start, end), saved in zip(_chunks(hidden.shape[0], chunk), _unflatten(flat, ctx.chunk_sizes)):
            h, rows = hidden[start:end], slice(start, end)
            z = _chunk_logits(h, weight, bias, buffer)
            dz, dtab = ops.backward_rows(
                z, labels[rows], table, tuple(saved), grad_ce[rows], grad_cos[rows],
                temperature, k, ignore_index, with_cos, grads.need_logits, grads.need_table)
            grads.add_chunk(dz, dtab, h, weight, rows)
        return (*grads.in_input_dtypes(), None, None, None, None, None, None, None)


class _Gradients:
    """The gradients of hidden, weight, bias and embedding, filled chunk by chunk from each
    chunk's logits gradient: d hidden in hidden's dtype, the others in float32 (float64)
    accumulators, in chunk order. Tied (``embedding is None``): the embedding's gradient
    goes to weight's accumulator."""

    def __init__(self, hidden, weight, bias, embedding, needs, with_cos):
        need_hidden, need_weight, need_bias, need_embedding = needs
        self.inputs = (hidden, weight, bias, embedding)
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = _accumulator(weight) if need_weight else None
        self.bias = _accumulator(bias) if need_bias else None
        # without the cosine term the loss does not depend on an untied embedding: no gradient, as in mixed_loss
        self.embedding = _accumulator(embedding) if need_embedding and with_cos else None
        self.table = self.weight if embedding is None else self.embedding
        self.need_logits = need_hidden or need_weight or need_bias
        self.need_table = with_cos and self.table is not None

    def float32_table(self):
        """The table's accumulator where a backend can add into it (float32), else None."""
        return self.table if self.need_table and self.table.dtype == torch.float32 else None

    def add_chunk(self, dz, dtable, h, weight, rows) -> None:
        """The chunk's share: d hidden[rows] = dz @ weight, d weight += dz.T @ h, d bias += sum dz,
        and the embedding gradient the backend returned (None when it added it itself)."""
        if dtable is not None:
            self.table += dtable
        if self.hidden is not None:
            torch.mm(dz, weight, out=self.hidden[rows])
        if self.weight is not None:
            _accumulate_mm(self.weight, dz.t(), h)
        if self.bias is not None:
            self.bias += dz.sum(dim=0, dtype=self.bias.dtype)

    def in_input_dtypes(self, scale=None) -> tuple:
        """(d hidden, d weight, d bias, d embedding) in the inputs' dtypes, times ``scale`` if given."""
        grads = (self.hidden, self.weight, self.bias, self.embedding)
        return tuple(None if g is None else (g if scale is None else g * scale).to(like.dtype)
                     for g, like in zip(grads, self.inputs))


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


def _unflatten(flat, sizes):
    start = 0
    for size in sizes:
        yield flat[start:start + size]
        start += size
