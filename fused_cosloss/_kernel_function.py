"""The autograd Function shared by the kernel backends (native C++, Triton).

A kernel backend is a module with three functions; ``k`` is already min(topk, V):

``unavailable_reason(logits, embedding) -> str | None``
    Why it cannot run on these tensors (device, dtype, missing build), or None.
``forward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos)``
    ``-> (ce, cos, correct, saved)``: ``[N]`` per-position ce_n and cos_n (float32, or
    float64 for float64 logits; zero at ignored positions; cos zero everywhere when
    ``with_cos`` is False), ``[N]`` bool argmax == label, and a tuple of tensors the
    backward needs (O(N * (K + H)) memory at most).
``backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k,``
``ignore_index, with_cos, need_logits_grad, need_embedding_grad, inplace=False,``
``embedding_grad_out=None) -> (dlogits, dembedding)``
    The SPEC gradients of ``sum_n grad_ce[n] * ce_n + grad_cos[n] * cos_n`` (``grad_*``
    are ``[N]`` float32/float64), in the dtypes of logits and embedding, or None where
    not needed. ``inplace``: the logits gradient is written over ``logits`` (and that
    tensor returned). ``embedding_grad_out``: a float32 ``[V, H]`` tensor the embedding
    gradient is added to (None is returned for it).
``fake_forward_rows(...)`` (same arguments as ``forward_rows``)
    Empty tensors of the shapes, dtypes and devices ``forward_rows`` returns, for the
    ``torch.compile`` path: there the backend runs as the custom ops of ``_custom_ops.py``
    (``fused_cosloss::rows_forward`` / ``rows_backward``), whose fake kernels use it.

The inputs arrive as ``logits [N, V]`` with unit stride along V, ``labels [N]`` int64
and ``embedding [V, H]``, both contiguous.
"""
from __future__ import annotations

import torch


class KernelRows(torch.autograd.Function):
    """Per-position (ce, cos, correct) from a kernel backend, differentiable in logits and embedding."""

    @staticmethod
    def forward(ctx, logits, embedding, labels, ops, temperature, k, ignore_index, with_cos, inplace_grad=False):
        ce, cos, correct, saved = ops.forward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(logits, embedding, labels, *saved)
        ctx.options = (ops, temperature, k, ignore_index, with_cos, inplace_grad)
        return ce, cos, correct

    @staticmethod
    def backward(ctx, grad_ce, grad_cos, _grad_correct):
        logits, embedding, labels, *saved = ctx.saved_tensors
        ops, temperature, k, ignore_index, with_cos, inplace_grad = ctx.options
        dlogits, dembedding = ops.backward_rows(
            logits, labels, embedding, tuple(saved), grad_ce.contiguous(), grad_cos.contiguous(),
            temperature, k, ignore_index, with_cos, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            inplace=inplace_grad,
        )
        if inplace_grad and dlogits is not None:
            # the logits now hold their gradient: any other use autograd saved of them must fail loudly
            torch.autograd.graph.increment_version(dlogits)
        return dlogits, dembedding, None, None, None, None, None, None, None


def kernel_layouts(logits, labels, embedding):
    """The layouts the protocol promises a kernel (no copy where the inputs already have them)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, labels.long().contiguous(), embedding.contiguous()


def kernel_rows(ops, logits, labels, embedding, temperature, k, ignore_index, with_cos, inplace_grad=False):
    """Run a kernel backend on ``logits [N, V]``, making the layouts it expects (``inplace_grad``:
    the backward writes the logits gradient over the logits)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    return KernelRows.apply(
        logits, embedding, labels, ops, float(temperature), int(k), int(ignore_index), bool(with_cos),
        bool(inplace_grad),
    )
