"""``mixed_loss``: next-token cross-entropy mixed with a cosine distance in embedding space."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import backends
from .autograd import GradIntoLogitsFunction, kernel_loss, kernel_rows
from .backends import Backend
from .compile_ops import compiled_kernel_rows
from .loss_math import loss_rows, reduce_positions
from .meta import meta_rows
from .options import LossOptions
from .reference import reference_rows
from .validation import check_flag, check_ignore_index, check_label_range, check_scalars, check_tensors


class MixedLossOutput(NamedTuple):
    """The loss with its parts and the counts evaluation needs (no logits kept).

    ``loss == alpha * cos + (1 - alpha) * ce``; ``ce`` and ``cos`` (the distance
    1 - cos_n) use the loss's reduction. ``n_valid``, ``n_correct`` (argmax == label)
    and ``cos_sim_sum`` (summed cosine similarity) are sums over valid positions,
    detached from the graph.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    cos: torch.Tensor
    n_valid: torch.Tensor
    n_correct: torch.Tensor
    cos_sim_sum: torch.Tensor


def mixed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    embedding: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    topk: int | None = 256,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    backend: str = "auto",
    return_parts: bool = False,
    inplace_grad: bool = False,
    grad_in_forward: bool | None = None,
):
    """The mixed loss of docs/spec.md: ``alpha * (1 - cos_n) + (1 - alpha) * ce_n`` per position.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 (or float64).
        labels: integer, the leading shape of ``logits``; ``ignore_index`` marks positions to skip.
        embedding: ``[V, H]`` token embedding (for tied models, the LM head weight).
        alpha: weight of the cosine term in [0, 1]; 0 is plain cross-entropy.
        temperature: T > 0 of the softmax over the top-k logits.
        topk: K >= 1, or None for the whole vocabulary.
        reduction: ``"mean"`` over valid positions (0 when none), ``"sum"`` or ``"none"``.
        shift: causal-LM shift for ``[B, T, V]`` logits: position t predicts ``labels[:, t + 1]``.
        backend: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"``.
        return_parts: return a :class:`MixedLossOutput` instead of the loss alone.
        inplace_grad: the logits' gradient is written over the logits themselves (their
            storage then holds the gradient; no second ``[N, V]`` tensor is allocated), as
            Liger-Kernel's cross-entropy does: by the backward, or by this call when
            ``grad_in_forward`` applies. Use it when nothing reads the logits afterwards;
            autograd raises if something it saved still needs them. Not supported under
            ``torch.compile``.
        grad_in_forward: compute the gradient of the reduced loss (``"mean"``/``"sum"``) in the
            forward, as Liger-Kernel's cross-entropy does: the Triton kernel then writes it in
            the pass that reads the logits, so they are read from device memory once, and
            nothing is kept for the backward, which only scales it by the incoming gradient
            (when that is not 1). The returned ``ce``/``cos`` parts are then for logging:
            differentiating them raises. None (the default) turns it on with a kernel backend
            when no parts are returned and a gradient is wanted; with ``inplace_grad`` the
            logits are overwritten by the call itself. Ignored by the reference backend and
            under ``torch.compile``.

    Returns:
        The loss (a scalar, or the per-position values for ``"none"``: 0 at ignored
        positions) in float32 (float64 for float64 logits), or a :class:`MixedLossOutput`.
    """
    alpha, temperature, topk = check_scalars(alpha, temperature, topk, reduction, backend)
    ignore_index = check_ignore_index(ignore_index)
    for name, flag in (("shift", shift), ("return_parts", return_parts), ("inplace_grad", inplace_grad)):
        check_flag(name, flag)
    check_flag("grad_in_forward", grad_in_forward, optional=True)
    check_tensors(logits, labels, embedding, shift)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits: expected a vocabulary size V >= 1, got shape {tuple(logits.shape)}")
    if shift:
        labels = shift_labels(labels, ignore_index)
    check_label_range(labels, vocab, ignore_index)
    if inplace_grad and torch.compiler.is_compiling():
        raise ValueError("inplace_grad: expected False under torch.compile (a traced graph may not write "
                         "over its inputs in the backward), got True")
    gradient_now = _grad_in_forward(grad_in_forward, reduction, return_parts, logits, embedding)

    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    options = LossOptions.resolve(temperature=temperature, topk=topk, vocab=vocab, ignore_index=ignore_index,
                                  with_cos=alpha > 0 or return_parts)
    finish = functools.partial(assemble, labels=labels, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                               shift=shift, return_parts=return_parts)
    if logits.is_meta:  # shapes and dtypes only (see meta.py)
        return finish(*meta_rows(flat_logits, cos_shared=(embedding,), with_cos=options.with_cos))
    chosen = backends.resolve(backend, flat_logits, embedding)
    if gradient_now and chosen.is_kernel:
        loss, *terms = kernel_loss(chosen.ops, flat_logits, flat_labels, embedding, options, alpha=alpha,
                                   reduction=reduction, inplace_grad=inplace_grad)
        return finish(*terms, loss=loss)
    return finish(*position_terms(chosen, flat_logits, flat_labels, embedding, options, inplace_grad=inplace_grad))


def position_terms(backend: Backend, logits, labels, embedding, options: LossOptions, *, inplace_grad=False):
    """``(ce, cos, correct)`` per position of ``logits [N, V]`` on the chosen backend: the reference
    differentiated by autograd, a kernel through its autograd Function, or, while ``torch.compile``
    traces, through its custom op (one opaque node of the graph)."""
    if not backend.is_kernel:
        if inplace_grad:
            logits = GradIntoLogitsFunction.apply(logits)
        return reference_rows(logits, labels, embedding, options)
    if torch.compiler.is_compiling():
        return compiled_kernel_rows(backend.name, logits, labels, embedding, options)
    return kernel_rows(backend.ops, logits, labels, embedding, options, inplace_grad=inplace_grad)


def _grad_in_forward(option, reduction, return_parts, logits, embedding) -> bool:
    """Whether this call computes the gradient in the forward where a kernel backend runs (see
    ``mixed_loss``'s grad_in_forward)."""
    if option is False:
        return False
    if option and reduction == "none":
        raise ValueError("grad_in_forward: expected reduction 'mean' or 'sum' (a scalar loss whose gradient the "
                         "forward can compute), got reduction='none'")
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled() or not (logits.requires_grad or embedding.requires_grad):
        return False
    return bool(option) or (reduction != "none" and not return_parts)


def assemble(ce_rows, cos_rows, correct, *, labels, alpha, ignore_index, reduction, shift, return_parts, loss=None):
    """The loss (or a :class:`MixedLossOutput`) from the per-position ce_n, cos_n and
    argmax == label of the flattened ``labels`` (already shifted when ``shift``); ``loss``,
    when given, is the reduced loss already computed (with its own gradient)."""
    valid = labels.reshape(-1) != ignore_index
    dist_rows, per_position = loss_rows(ce_rows, cos_rows, valid, alpha)
    n_valid = valid.sum()
    shape = labels.shape
    if loss is None:
        loss = reduce_positions(per_position, n_valid, reduction, shape, shift)
    if not return_parts:
        return loss
    return MixedLossOutput(
        loss=loss,
        ce=reduce_positions(ce_rows, n_valid, reduction, shape, shift),
        cos=reduce_positions(dist_rows, n_valid, reduction, shape, shift),
        n_valid=n_valid.detach(),
        n_correct=(correct & valid).sum().detach(),
        cos_sim_sum=torch.where(valid, cos_rows, torch.zeros_like(cos_rows)).sum().detach(),
    )


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[..., t + 1] at position t and ignore_index at the last: the causal shift
    without copying the logits (their last position is simply ignored)."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)
