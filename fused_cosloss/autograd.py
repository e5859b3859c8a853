"""The autograd Functions over a kernel backend (native C++, Triton; the protocol of
``protocol.py``): ``KernelRowsFunction`` (per-position outputs, the backward in the backward),
``KernelLossFunction`` (a reduced loss with its gradient computed in the forward:
``grad_in_forward``) and ``GradIntoLogitsFunction`` (``inplace_grad`` for the reference).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import UnsupportedDifferentiationError
from .loss_math import effective_weight, loss_coefficients, reduced_loss
from .options import LossOptions
from .protocol import forward_backward_rows
from .reference import compute_dtype, reference_rows

INPLACE_TWICE = ("mixed_loss: inplace_grad=True writes the logits gradient over the logits, so it cannot be "
                 "differentiated again (create_graph=True); pass inplace_grad=False for a higher-order gradient")


class Refusals(NamedTuple):
    """What a Function that computed its gradient in the forward says to the three uses it cannot
    serve exactly."""

    create_graph: str  # a backward with create_graph=True: that gradient has no graph
    parts: str  # a gradient arriving through the per-position parts, not the loss
    second_backward: str  # the gradient was handed to an earlier backward


GRAD_IN_FORWARD_REFUSALS = Refusals(
    create_graph=(
        "mixed_loss: with grad_in_forward the gradient is computed in the forward and cannot be "
        "differentiated again (create_graph=True, e.g. a gradient penalty); pass grad_in_forward=False "
        "(the backward then builds a differentiable graph) or backend='reference'"),
    parts=(
        "mixed_loss: with grad_in_forward the gradient is computed in the forward for the loss only, so its "
        ".ce, .cos and .z_loss parts cannot be differentiated; pass grad_in_forward=False to differentiate the parts"),
    second_backward=(
        "mixed_loss: the gradient computed in the forward (grad_in_forward) was already used by an earlier "
        "backward; pass grad_in_forward=False to run the backward more than once"),
)


def take_forward_gradients(ctx, grad_ce, grad_cos, refusals: Refusals, grad_lse=None):
    """The gradients the forward computed and left in ``ctx.gradients``, handed over once (autograd
    may keep them as ``.grad``); raises ``UnsupportedDifferentiationError`` with ``refusals``' message
    for a use that cannot get them exactly."""
    if torch.is_grad_enabled():
        raise UnsupportedDifferentiationError(refusals.create_graph)
    if grad_ce is not None or grad_cos is not None or grad_lse is not None:
        raise UnsupportedDifferentiationError(refusals.parts)
    if ctx.gradients is None:
        raise UnsupportedDifferentiationError(refusals.second_backward)
    gradients, ctx.gradients = ctx.gradients, None
    return gradients


class KernelRowsFunction(torch.autograd.Function):
    """Per-position (ce, cos, correct, lse) from a kernel backend, differentiable in logits and
    embedding (to any order: a backward with ``create_graph=True`` goes through
    ``differentiable_gradients``)."""

    @staticmethod
    def forward(ctx, logits, embedding, labels, ops, options: LossOptions, inplace_grad: bool):
        ce, cos, correct, lse, saved = ops.forward_rows(logits, labels, embedding, options)
        ctx.set_materialize_grads(False)  # an unused lse (no z-loss) then costs the backward nothing
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(logits, embedding, labels, *saved)
        ctx.ops, ctx.options, ctx.inplace_grad = ops, options, inplace_grad
        return ce, cos, correct, lse

    @staticmethod
    def backward(ctx, grad_ce, grad_cos, _grad_correct, grad_lse):
        logits, embedding, labels, *saved = ctx.saved_tensors
        if grad_ce is None and grad_cos is None and grad_lse is None:
            return None, None, None, None, None, None
        zeros = torch.zeros(logits.shape[0], device=logits.device, dtype=compute_dtype(logits.dtype))
        grad_ce = zeros if grad_ce is None else grad_ce
        grad_cos = zeros if grad_cos is None else grad_cos
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            if ctx.inplace_grad:
                raise UnsupportedDifferentiationError(INPLACE_TWICE)
            dlogits, dembedding = differentiable_gradients(
                logits, labels, embedding, grad_ce, grad_cos, ctx.options, grad_lse=grad_lse,
                need_logits_grad=ctx.needs_input_grad[0], need_embedding_grad=ctx.needs_input_grad[1])
            return dlogits, dembedding, None, None, None, None
        dlogits, dembedding = ctx.ops.backward_rows(
            logits, labels, embedding, tuple(saved), grad_ce.contiguous(), grad_cos.contiguous(), ctx.options,
            need_logits_grad=ctx.needs_input_grad[0], need_embedding_grad=ctx.needs_input_grad[1],
            inplace=ctx.inplace_grad, grad_lse=None if grad_lse is None else grad_lse.contiguous())
        if ctx.inplace_grad and dlogits is not None:
            # the logits now hold their gradient: any other use autograd saved of them must fail loudly
            torch.autograd.graph.increment_version(dlogits)
        return dlogits, dembedding, None, None, None, None


def differentiable_gradients(logits, labels, embedding, grad_ce, grad_cos, options: LossOptions, *,
                             need_logits_grad, need_embedding_grad, grad_lse=None):
    """The gradients of ``sum_n grad_ce[n] * ce_n + grad_cos[n] * cos_n + grad_lse[n] * lse_n`` as a
    graph of differentiable ops, for a backward run with ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product): a kernel's hand-written backward cannot be differentiated again, so
    these rows are recomputed by the reference's formulation (differentiable to any order) and
    differentiated by autograd. The same gradients, at the reference's cost, for that backward only."""
    inputs = [tensor for tensor, wanted in ((logits, need_logits_grad), (embedding, need_embedding_grad)) if wanted]
    if not inputs:
        return None, None
    with torch.enable_grad():
        ce, cos, _, lse = reference_rows(logits, labels, embedding, options)
    pairs = [(out, grad) for out, grad in ((ce, grad_ce), (cos, grad_cos), (lse, grad_lse))
             if out.requires_grad and grad is not None]
    grads = iter(torch.autograd.grad([out for out, _ in pairs], inputs, [grad for _, grad in pairs],
                                     create_graph=True, allow_unused=True, materialize_grads=True) if pairs else
                 [torch.zeros_like(tensor) for tensor in inputs])
    dlogits = next(grads) if need_logits_grad else None
    dembedding = next(grads) if need_embedding_grad else None
    if not options.with_cos:
        dembedding = None  # the loss does not depend on the embedding then (as every backend returns)
    return dlogits, dembedding


def kernel_layouts(logits, labels, embedding):
    """The layouts the protocol promises a kernel (no copy where the inputs already have them)."""
    if logits.stride(-1) != 1:
        # an empty tensor counts as contiguous whatever its strides, so .contiguous() would keep them
        logits = logits.clone(memory_format=torch.contiguous_format) if logits.numel() == 0 else logits.contiguous()
    return logits, labels.long().contiguous(), embedding.contiguous()


def kernel_rows(ops, logits, labels, embedding, options: LossOptions, *, inplace_grad=False):
    """Run a kernel backend on ``logits [N, V]``, making the layouts it expects (``inplace_grad``:
    the backward writes the logits gradient over the logits)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    return KernelRowsFunction.apply(logits, embedding, labels, ops, options, bool(inplace_grad))


class KernelLossFunction(torch.autograd.Function):
    """(loss, ce, cos, correct, lse) from a kernel backend with the gradients of the reduced loss
    (mean or sum) computed in the forward, as Liger-Kernel's cross-entropy does: the
    per-position coefficients are known there (``loss_coefficients``: (1 - alpha) on ce_n,
    -alpha on cos_n, zeta on lse_n^2, times w_n and 1 / W for the mean), so a backend with
    ``forward_backward_rows`` writes the logits gradient while it reads the logits, and nothing
    is saved for the backward; the backward only scales the gradients by the incoming one (when
    it is not 1). Other backends run ``forward_rows`` then ``backward_rows``.

    ``ce``, ``cos`` and ``lse`` (per position) are outputs for the parts and metrics: a gradient
    arriving through them is refused, since the forward computed the gradient of ``loss``. The
    weight is a constant here (``mixed_loss`` does not take this path for one that requires grad)."""

    @staticmethod
    def forward(ctx, logits, embedding, labels, ops, options: LossOptions, alpha, reduction, inplace_grad, z_loss,
                weight):
        ctx.set_materialize_grads(False)
        valid = labels != options.ignore_index
        weight = effective_weight(valid, weight, torch.float32)
        coef_ce, coef_cos, coef_lse_square, scale = loss_coefficients(valid, alpha, reduction, torch.float32,
                                                                      weight=weight, z_loss=z_loss)
        ce, cos, correct, lse, dlogits, dembedding = forward_backward_rows(
            ops, logits, labels, embedding, coef_ce, coef_cos, options, need_logits_grad=ctx.needs_input_grad[0],
            need_embedding_grad=ctx.needs_input_grad[1] and options.with_cos, inplace=inplace_grad,
            grad_lse_square=coef_lse_square)
        if inplace_grad and dlogits is not None:
            # the logits now hold their gradient: any other use autograd saved of them must fail loudly
            torch.autograd.graph.increment_version(dlogits)
        ctx.mark_non_differentiable(correct)
        ctx.gradients = (dlogits, dembedding)
        loss = reduced_loss(ce, cos, lse, valid, alpha, scale, z_loss=z_loss, weight=weight)
        return loss, ce, cos, correct, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_cos, _grad_correct, grad_lse):
        dlogits, dembedding = take_forward_gradients(ctx, grad_ce, grad_cos, GRAD_IN_FORWARD_REFUSALS, grad_lse)
        if grad_loss is None:
            return None, None, None, None, None, None, None, None, None, None
        return (_scaled(dlogits, grad_loss), _scaled(dembedding, grad_loss), None, None, None, None, None, None, None,
                None)


def _scaled(gradient, grad_loss):
    """gradient * grad_loss, in place; skipped (a device sync decides) when grad_loss is 1, as after
    ``loss.backward()``."""
    if gradient is None or bool(grad_loss == 1):
        return gradient
    return gradient.mul_(grad_loss)


def kernel_loss(ops, logits, labels, embedding, options: LossOptions, *, alpha, reduction, inplace_grad=False,
                z_loss=0.0, weight=None):
    """``(loss, ce, cos, correct, lse)`` of a kernel backend on ``logits [N, V]`` with the gradient of
    the reduced loss computed in the forward (see KernelLossFunction; ``weight``: ``[N]`` or None)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    return KernelLossFunction.apply(logits, embedding, labels, ops, options, float(alpha), reduction,
                                    bool(inplace_grad), float(z_loss), None if weight is None else weight.detach())


class GradIntoLogitsFunction(torch.autograd.Function):
    """Identity whose backward copies the incoming gradient into the input's storage and returns
    that storage: ``inplace_grad`` for the reference (same result, no memory saved)."""

    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a copy into the logits' storage has no graph
            raise UnsupportedDifferentiationError(INPLACE_TWICE)
        (logits,) = ctx.saved_tensors
        with torch.no_grad():
            logits.copy_(grad)
        return logits
