"""The autograd Functions shared by the kernel backends (native C++, Triton): ``KernelRows``
(per-position outputs, the backward in the backward) and ``KernelLoss`` (a reduced loss with
its gradient computed in the forward: ``grad_in_forward``).

A kernel backend is a module with these functions; ``k`` is already min(topk, V):

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
    The gradients (docs/spec.md) of ``sum_n grad_ce[n] * ce_n + grad_cos[n] * cos_n`` (``grad_*``
    are ``[N]`` float32/float64), in the dtypes of logits and embedding, or None where
    not needed. ``inplace``: the logits gradient is written over ``logits`` (and that
    tensor returned). ``embedding_grad_out``: a float32 ``[V, H]`` tensor the embedding
    gradient is added to (None is returned for it).
``forward_backward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos,``
``grad_ce, grad_cos, need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None)``
    Optional: ``-> (ce, cos, correct, dlogits, dembedding)``, both at once, for a backend
    that can write the gradient in the pass that reads the logits (Triton); ``forward_backward``
    composes it from the other two for the rest.
``fake_forward_rows(...)`` (same arguments as ``forward_rows``)
    Empty tensors of the shapes, dtypes and devices ``forward_rows`` returns, for the
    ``torch.compile`` path: there the backend runs as the custom ops of ``_custom_ops.py``
    (``fused_cosloss::rows_forward`` / ``rows_backward``), whose fake kernels use it.

The inputs arrive as ``logits [N, V]`` with unit stride along V, ``labels [N]`` int64
and ``embedding [V, H]``, both contiguous.
"""
from __future__ import annotations

import torch

from ._loss_terms import loss_coefficients, reduced_loss
from .errors import UnsupportedDifferentiationError
from .reference import reference_rows


class KernelRows(torch.autograd.Function):
    """Per-position (ce, cos, correct) from a kernel backend, differentiable in logits and embedding
    (to any order: a backward with ``create_graph=True`` goes through ``differentiable_gradients``)."""

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
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            if inplace_grad:
                raise UnsupportedDifferentiationError(
                    "mixed_loss: inplace_grad=True writes the logits gradient over the logits, so it cannot be "
                    "differentiated again (create_graph=True); pass inplace_grad=False for a higher-order gradient")
            dlogits, dembedding = differentiable_gradients(
                logits, labels, embedding, grad_ce, grad_cos, temperature, k, ignore_index, with_cos,
                need_logits_grad=ctx.needs_input_grad[0], need_embedding_grad=ctx.needs_input_grad[1])
            return dlogits, dembedding, None, None, None, None, None, None, None
        dlogits, dembedding = ops.backward_rows(
            logits, labels, embedding, tuple(saved), grad_ce.contiguous(), grad_cos.contiguous(),
            temperature, k, ignore_index, with_cos, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            inplace=inplace_grad,
        )
        if inplace_grad and dlogits is not None:
            # the logits now hold their gradient: any other use autograd saved of them must fail loudly
            torch.autograd.graph.increment_version(dlogits)
        return dlogits, dembedding, None, None, None, None, None, None, None


def differentiable_gradients(logits, labels, embedding, grad_ce, grad_cos, temperature, k, ignore_index, with_cos,
                             *, need_logits_grad, need_embedding_grad):
    """The gradients of ``sum_n grad_ce[n] * ce_n + grad_cos[n] * cos_n`` as a graph of differentiable
    ops, for a backward run with ``create_graph=True`` (a gradient penalty, a Hessian-vector product):
    a kernel's hand-written backward cannot be differentiated again, so these rows are recomputed
    by the reference's formulation (differentiable to any order) and differentiated by autograd.
    The same gradients, at the reference's cost, for that backward only."""
    inputs = [tensor for tensor, wanted in ((logits, need_logits_grad), (embedding, need_embedding_grad)) if wanted]
    if not inputs:
        return None, None
    with torch.enable_grad():
        ce, cos, _ = reference_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos)
    pairs = [(out, grad) for out, grad in ((ce, grad_ce), (cos, grad_cos)) if out.requires_grad and grad is not None]
    grads = iter(torch.autograd.grad([out for out, _ in pairs], inputs, [grad for _, grad in pairs],
                                     create_graph=True, allow_unused=True, materialize_grads=True) if pairs else
                 [torch.zeros_like(tensor) for tensor in inputs])
    dlogits = next(grads) if need_logits_grad else None
    dembedding = next(grads) if need_embedding_grad else None
    if not with_cos:
        dembedding = None  # the loss does not depend on the embedding then (as every backend returns)
    return dlogits, dembedding


def kernel_layouts(logits, labels, embedding):
    """The layouts the protocol promises a kernel (no copy where the inputs already have them)."""
    if logits.stride(-1) != 1:
        # an empty tensor counts as contiguous whatever its strides, so .contiguous() would keep them
        logits = logits.clone(memory_format=torch.contiguous_format) if logits.numel() == 0 else logits.contiguous()
    return logits, labels.long().contiguous(), embedding.contiguous()


def kernel_rows(ops, logits, labels, embedding, temperature, k, ignore_index, with_cos, inplace_grad=False):
    """Run a kernel backend on ``logits [N, V]``, making the layouts it expects (``inplace_grad``:
    the backward writes the logits gradient over the logits)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    return KernelRows.apply(
        logits, embedding, labels, ops, float(temperature), int(k), int(ignore_index), bool(with_cos),
        bool(inplace_grad),
    )


class KernelLoss(torch.autograd.Function):
    """(loss, ce, cos, correct) from a kernel backend with the gradients of the reduced loss
    (mean or sum) computed in the forward, as Liger-Kernel's cross-entropy does: the
    per-position coefficients are known there ((1 - alpha) on ce_n, -alpha on cos_n, times
    1 / N_valid for the mean), so a backend with ``forward_backward_rows`` writes the logits
    gradient while it reads the logits, and nothing is saved for the backward; the backward
    only scales the gradients by the incoming one (when it is not 1). Other backends run
    ``forward_rows`` then ``backward_rows``.

    ``ce`` and ``cos`` (per position) are outputs for the parts and metrics: a gradient
    arriving through them is refused, since the forward computed the gradient of ``loss``."""

    @staticmethod
    def forward(ctx, logits, embedding, labels, ops, temperature, k, ignore_index, with_cos, alpha, reduction,
                inplace_grad):
        ctx.set_materialize_grads(False)
        valid = labels != ignore_index
        coef_ce, coef_cos, scale = loss_coefficients(valid, alpha, reduction, torch.float32)
        need_logits, need_embedding = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and with_cos
        ce, cos, correct, dlogits, dembedding = forward_backward(ops)(
            logits, labels, embedding, temperature, k, ignore_index, with_cos, coef_ce, coef_cos,
            need_logits, need_embedding, inplace=inplace_grad)
        if inplace_grad and dlogits is not None:
            # the logits now hold their gradient: any other use autograd saved of them must fail loudly
            torch.autograd.graph.increment_version(dlogits)
        ctx.mark_non_differentiable(correct)
        ctx.gradients = (dlogits, dembedding)
        loss = reduced_loss(ce, cos, valid, alpha, scale)
        return loss, ce, cos, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_cos, _grad_correct):
        if torch.is_grad_enabled():  # create_graph=True: the gradient computed in the forward has no graph
            raise UnsupportedDifferentiationError(
                "mixed_loss: with grad_in_forward the gradient is computed in the forward and cannot be "
                "differentiated again (create_graph=True, e.g. a gradient penalty); pass grad_in_forward=False "
                "(the backward then builds a differentiable graph) or backend='reference'")
        if grad_ce is not None or grad_cos is not None:
            raise UnsupportedDifferentiationError(
                "mixed_loss: with grad_in_forward the gradient is computed in the forward for the loss only, so its "
                ".ce and .cos parts cannot be differentiated; pass grad_in_forward=False to differentiate the parts")
        if ctx.gradients is None:
            raise UnsupportedDifferentiationError(
                "mixed_loss: the gradient computed in the forward (grad_in_forward) was already used by an earlier "
                "backward; pass grad_in_forward=False to run the backward more than once")
        (dlogits, dembedding), ctx.gradients = ctx.gradients, None  # handed over: autograd may keep them as .grad
        if grad_loss is None:
            return (None,) * 11
        return _scaled(dlogits, grad_loss), _scaled(dembedding, grad_loss), *(None,) * 9


def forward_backward(ops):
    """The backend's ``forward_backward_rows``, or ``forward_rows`` then ``backward_rows``."""
    fused = getattr(ops, "forward_backward_rows", None)
    if fused is not None:
        return fused

    def run(logits, labels, embedding, temperature, k, ignore_index, with_cos, grad_ce, grad_cos,
            need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None):
        ce, cos, correct, saved = ops.forward_rows(logits, labels, embedding, temperature, k, ignore_index, with_cos)
        dlogits, dembedding = ops.backward_rows(
            logits, labels, embedding, saved, grad_ce, grad_cos, temperature, k, ignore_index, with_cos,
            need_logits_grad, need_embedding_grad, inplace=inplace, embedding_grad_out=embedding_grad_out)
        return ce, cos, correct, dlogits, dembedding

    return run


def _scaled(gradient, grad_loss):
    """gradient * grad_loss, in place; skipped (a device sync decides) when grad_loss is 1, as after
    ``loss.backward()``."""
    if gradient is None or bool(grad_loss == 1):
        return gradient
    return gradient.mul_(grad_loss)


def kernel_loss(ops, logits, labels, embedding, temperature, k, ignore_index, with_cos, alpha, reduction,
                inplace_grad=False):
    """``(loss, ce, cos, correct)`` of a kernel backend on ``logits [N, V]`` with the gradient of the
    reduced loss computed in the forward (see KernelLoss)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    return KernelLoss.apply(
        logits, embedding, labels, ops, float(temperature), int(k), int(ignore_index), bool(with_cos), float(alpha),
        reduction, bool(inplace_grad),
    )
