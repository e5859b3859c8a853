"""The autograd Functions of the fused-linear mode: the mixed loss from hidden states,
one chunk of logits at a time.

``LinearMixedLossFunction`` (the training path: a reduced loss, gradients wanted) computes the
gradients in the forward, as Liger-Kernel's fused linear cross-entropy does: the loss's
per-position coefficients are known there ((1 - alpha) on ce_n, -alpha on cos_n, times
1 / N_valid for the mean), so each chunk's logits gradient is written over the chunk's
logits in place (by the Triton row kernel in the pass that reads them: ``forward_backward_rows``),
turned into the hidden / weight / bias gradients at once and dropped;
the backward only scales them by the incoming gradient. Nothing per position is kept.

``LinearMixedRowsFunction`` (per-position outputs, ``reduction="none"``, or no gradient) is the
general form described below.

For each chunk of rows, ``z = hidden[chunk] @ weight.T (+ bias)`` is computed into a
buffer reused by every chunk and handed to a kernel backend (the protocol of
``protocol.py``; the reference takes part through ``reference_backend.py``). The
forward keeps only what the backend saves per row, O(N * (K + H)); the backward
recomputes each chunk's logits, asks the backend for their gradient and turns it into
the gradients of hidden, weight and bias with three matmuls:

    d hidden[chunk] = dz @ weight,   d weight += dz.T @ hidden[chunk],   d bias += sum_rows dz

The embedding's gradient (the cosine term's) goes to ``weight`` when the embedding is
tied to it (``embedding is None``). ``weight``, ``bias`` and ``embedding`` gradients
accumulate in float32 over the chunks, in chunk order, so the result does not change from
run to run; for bfloat16 / float16 inputs each chunk's ``dz.T @ hidden[chunk]`` enters that
sum unrounded (computed with a float32 output, ``_add_transposed_product``) and the sum is
rounded to the input dtype once, at the end. Rounding each chunk's product first (as
Liger-Kernel's fused linear cross-entropy does) adds one rounding of the input dtype per
chunk. ``d hidden`` needs no accumulator: each row's is one matmul over the vocabulary.

Higher-order gradients: ``LinearMixedRowsFunction``'s backward, run with ``create_graph=True``,
recomputes each chunk with the reference's differentiable formulation and differentiates it
(``_differentiable_backward``). ``LinearMixedLossFunction`` computed its gradient in the forward and
hands it to the first backward: a second backward or a ``create_graph=True`` one raises
``UnsupportedDifferentiationError`` naming ``reduction="none"``.

The backward's logits are recomputed by the same matmul on the same inputs; backends
that decide top-k membership from the saved threshold (Triton) rely on that matmul
giving the same bits twice, which BLAS libraries and cuBLAS do for identical calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .autograd import Refusals, take_forward_gradients
from .loss_math import effective_weight, loss_coefficients, reduced_loss
from .options import LossOptions
from .protocol import forward_backward_rows
from .reference import reference_rows

# Where a chunk's product cannot be computed with a float32 output directly, its float32
# temporaries (an upcast block of the logits gradient, or the block's product) hold at most
# this many elements: the vocabulary is taken a block of rows at a time.
PRODUCT_BLOCK_ELEMENTS = 2**22


REFUSALS = Refusals(
    create_graph=(
        "linear_mixed_loss: with reduction='mean' or 'sum' the gradient is computed in the forward, so it "
        "cannot be differentiated again (create_graph=True, e.g. a gradient penalty); use reduction='none' "
        "and reduce the per-position losses yourself (loss.sum() / number of valid labels for the mean): "
        "its backward recomputes each chunk and builds a differentiable graph"),
    parts=(
        "linear_mixed_loss: with reduction='mean' or 'sum' the gradient is computed in the forward for the "
        "loss only, so its .ce, .cos and .z_loss parts cannot be differentiated; use reduction='none' (and reduce "
        "the per-position values yourself) to differentiate the parts"),
    second_backward=(
        "linear_mixed_loss: with reduction='mean' or 'sum' the gradient computed in the forward was handed "
        "to the first backward, so a second backward through the same loss cannot give it again "
        "(retain_graph=True does not keep it); compute the loss again for each backward, or use "
        "reduction='none' and reduce the per-position losses yourself: its backward recomputes each chunk "
        "and can run more than once"),
)


class LinearMixedLossFunction(torch.autograd.Function):
    """(loss, ce, cos, correct, lse) from hidden states with the loss's gradients computed in the forward.

    ``ce``, ``cos`` and ``lse`` (per position) are outputs for the parts and metrics only: a gradient
    arriving through them is refused, since the forward computed the gradient of ``loss``. The
    per-position weight is a constant here (``linear_mixed_loss`` does not take this path for one
    that requires grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, embedding, labels, ops, options: LossOptions, chunk, alpha, reduction,
                z_loss, position_weight):
        ctx.set_materialize_grads(False)
        table = weight if embedding is None else embedding
        n = hidden.shape[0]
        grads = _Gradients(hidden, weight, bias, embedding, ctx.needs_input_grad[:4], options.with_cos)
        ce, cos, correct, lse = _row_outputs(hidden, n)
        valid = labels != options.ignore_index
        position_weight = effective_weight(valid, position_weight, ce.dtype)
        coef_ce, coef_cos, coef_lse_square, scale = loss_coefficients(valid, alpha, reduction, ce.dtype,
                                                                      weight=position_weight, z_loss=z_loss)
        buffer = _logits_buffer(hidden, weight, min(chunk, n))
        for start, end in _chunks(n, chunk):
            h, rows = hidden[start:end], slice(start, end)
            z = _chunk_logits(h, weight, bias, buffer)
            if not (grads.need_logits or grads.need_table):
                ce[rows], cos[rows], correct[rows], lse[rows], _ = ops.forward_rows(z, labels[rows], table, options)
                continue
            # the chunk's gradient over its logits, the embedding's added to its accumulator
            ce[rows], cos[rows], correct[rows], lse[rows], dz, dtab = forward_backward_rows(
                ops, z, labels[rows], table, coef_ce[rows], coef_cos[rows], options,
                need_logits_grad=grads.need_logits, need_embedding_grad=grads.need_table, inplace=True,
                embedding_grad_out=grads.float32_table(),
                grad_lse_square=None if coef_lse_square is None else coef_lse_square[rows])
            grads.add_chunk(dz, dtab, h, weight, rows)
        loss = reduced_loss(ce, cos, lse, valid, alpha, scale, z_loss=z_loss, weight=position_weight)
        ctx.mark_non_differentiable(correct)
        ctx.gradients = grads
        return loss, ce, cos, correct, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_cos, _grad_correct, grad_lse):
        grads = take_forward_gradients(ctx, grad_ce, grad_cos, REFUSALS, grad_lse)
        if grad_loss is None:
            return (None,) * 12
        return (*grads.in_input_dtypes(grad_loss), None, None, None, None, None, None, None, None)


class LinearMixedRowsFunction(torch.autograd.Function):
    """Per-position (ce, cos, correct, lse) from ``hidden [N, H]``, ``weight [V, H]`` (and ``bias``,
    ``embedding``), differentiable in hidden, weight, bias and embedding."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, embedding, labels, ops, options: LossOptions, chunk):
        table = weight if embedding is None else embedding
        n = hidden.shape[0]
        ce, cos, correct, lse = _row_outputs(hidden, n)
        saved_chunks = []
        buffer = _logits_buffer(hidden, weight, min(chunk, n))
        for start, end in _chunks(n, chunk):
            z = _chunk_logits(hidden[start:end], weight, bias, buffer)
            ce_c, cos_c, correct_c, lse_c, saved = ops.forward_rows(z, labels[start:end], table, options)
            ce[start:end], cos[start:end], correct[start:end], lse[start:end] = ce_c, cos_c, correct_c, lse_c
            saved_chunks.append(saved)
        ctx.mark_non_differentiable(correct)
        ctx.chunk_sizes = [len(saved) for saved in saved_chunks]
        ctx.save_for_backward(hidden, weight, bias, embedding, labels, *[t for s in saved_chunks for t in s])
        ctx.ops, ctx.options, ctx.chunk = ops, options, chunk
        return ce, cos, correct, lse

    @staticmethod
    def backward(ctx, grad_ce, grad_cos, _grad_correct, grad_lse):
        hidden, weight, bias, embedding, labels, *flat = ctx.saved_tensors
        options, chunk = ctx.options, ctx.chunk
        zeros = torch.zeros(hidden.shape[0], device=hidden.device, dtype=_row_outputs(hidden, 0)[0].dtype)
        grad_ce = zeros if grad_ce is None else grad_ce.contiguous()
        grad_cos = zeros if grad_cos is None else grad_cos.contiguous()
        grad_lse = None if grad_lse is None else grad_lse.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return (*_differentiable_backward(hidden, weight, bias, embedding, labels, grad_ce, grad_cos, grad_lse,
                                              ctx.needs_input_grad[:4], options, chunk),
                    None, None, None, None)
        table = weight if embedding is None else embedding
        grads = _Gradients(hidden, weight, bias, embedding, ctx.needs_input_grad[:4], options.with_cos)
        buffer = _logits_buffer(hidden, weight, min(chunk, hidden.shape[0]))
        for (start, end), saved in zip(_chunks(hidden.shape[0], chunk), _unflatten(flat, ctx.chunk_sizes)):
            h, rows = hidden[start:end], slice(start, end)
            z = _chunk_logits(h, weight, bias, buffer)
            dz, dtab = ctx.ops.backward_rows(
                z, labels[rows], table, tuple(saved), grad_ce[rows], grad_cos[rows], options,
                need_logits_grad=grads.need_logits, need_embedding_grad=grads.need_table,
                embedding_grad_out=grads.float32_table(), grad_lse=None if grad_lse is None else grad_lse[rows])
            grads.add_chunk(dz, dtab, h, weight, rows)
        return (*grads.in_input_dtypes(), None, None, None, None)


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
            _add_transposed_product(self.weight, dz, h)
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
    return ce, torch.zeros_like(ce), torch.zeros(n, device=hidden.device, dtype=torch.bool), torch.zeros_like(ce)


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
    return torch.zeros(like.shape, device=like.device, dtype=_accumulator_dtype(like))


def _accumulator_dtype(like):
    """float64 for float64, float32 for everything else."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _add_transposed_product(acc, dz, h):
    """acc += dz.T @ h with the product in acc's dtype (float32 for bfloat16 / float16 inputs):
    never rounded to the inputs' dtype before the sum. One addmm when the dtypes agree; else,
    a block of vocabulary rows at a time, a matmul with a float32 output where torch has one
    for the device (cuBLAS), or the block upcast to float32 (CPU: faster there than a bfloat16
    matmul without AMX, and torch has no float32-output matmul on CPU)."""
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.t(), h)
        return
    float32_output = _has_float32_output_mm(dz.device, dz.dtype, acc.dtype)
    h_acc = None if float32_output else h.to(acc.dtype)
    # the float32 temporary: the block's product [step, H], or its upcast logits gradient [rows, step]
    step = max(1, PRODUCT_BLOCK_ELEMENTS // max(h.shape[1] if float32_output else dz.shape[0], 1))
    for start in range(0, dz.shape[1], step):
        block = dz[:, start:start + step]
        if float32_output:
            acc[start:start + step] += torch.mm(block.t(), h, out_dtype=acc.dtype)
        else:
            acc[start:start + step].addmm_(block.to(acc.dtype).t(), h_acc)


_FLOAT32_OUTPUT_MM: dict = {}


def _has_float32_output_mm(device, dtype, out_dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=out_dtype)`` runs for ``dtype`` inputs on this device
    (cuBLAS since torch 2.8; not on CPU, where the product is upcast instead). Probed once."""
    if device.type == "cpu":
        return False
    key = (device.type, dtype, out_dtype)
    if key not in _FLOAT32_OUTPUT_MM:
        probe = torch.ones(1, 1, device=device, dtype=dtype)
        try:
            torch.mm(probe, probe, out_dtype=out_dtype)
            _FLOAT32_OUTPUT_MM[key] = True
        except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
            _FLOAT32_OUTPUT_MM[key] = False
    return _FLOAT32_OUTPUT_MM[key]


def _differentiable_backward(hidden, weight, bias, embedding, labels, grad_ce, grad_cos, grad_lse, needs,
                             options: LossOptions, chunk):
    """(d hidden, d weight, d bias, d embedding) of ``sum_n grad_ce[n] ce_n + grad_cos[n] cos_n
    (+ grad_lse[n] lse_n)`` as a
    graph of differentiable ops, for a backward run with ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product): the backends' hand-written backwards cannot be differentiated again, so
    each chunk's logits and rows are recomputed by the reference's formulation (differentiable to any
    order, whichever backend ran the forward) and differentiated by autograd. Every chunk's graph is
    kept for the next differentiation: this backward costs the reference's memory on every chunk.
    The shared gradients are summed over the chunks in float32 (float64) and rounded once."""
    need_hidden, need_weight, need_bias, need_embedding = needs
    with_cos = options.with_cos
    need_embedding = need_embedding and with_cos  # without the cosine term the embedding has no gradient
    table = weight if embedding is None else embedding
    shared = [t for t, wanted in ((weight, need_weight), (bias, need_bias), (embedding, need_embedding)) if wanted]
    hidden_grads = []
    totals = [torch.zeros(t.shape, device=t.device, dtype=_accumulator_dtype(t)) for t in shared]
    with torch.enable_grad():
        for start, end in _chunks(hidden.shape[0], chunk):
            h = hidden[start:end]
            ce, cos, _, lse = reference_rows(F.linear(h, weight, bias), labels[start:end], table, options)
            objective = (grad_ce[start:end].to(ce.dtype) * ce).sum()
            if with_cos:
                objective = objective + (grad_cos[start:end].to(cos.dtype) * cos).sum()
            if grad_lse is not None:
                objective = objective + (grad_lse[start:end].to(lse.dtype) * lse).sum()
            inputs = ([h] if need_hidden else []) + shared
            if objective.requires_grad:
                grads = list(torch.autograd.grad(objective, inputs, create_graph=True, materialize_grads=True))
            else:  # nothing it depends on requires grad
                grads = [torch.zeros_like(t) for t in inputs]
            if need_hidden:
                hidden_grads.append(grads.pop(0))
            totals = [total + grad.to(total.dtype) for total, grad in zip(totals, grads)]
    shared_grads = iter(total.to(t.dtype) for total, t in zip(totals, shared))
    d_hidden = None
    if need_hidden:
        d_hidden = torch.cat(hidden_grads) if hidden_grads else torch.zeros_like(hidden)
    return (d_hidden, next(shared_grads) if need_weight else None, next(shared_grads) if need_bias else None,
            next(shared_grads) if need_embedding else None)


def _unflatten(flat, sizes):
    start = 0
    for size in sizes:
        yield flat[start:start + size]
        start += size
