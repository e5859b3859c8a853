"""``mixed_loss``: next-token cross-entropy mixed with a cosine distance in embedding space."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from ._compiler_marks import assume_constant_result
from ._custom_ops import compiled_kernel_rows
from ._kernel_function import kernel_loss, kernel_rows
from ._loss_terms import loss_rows
from ._meta import meta_rows
from ._validation import check_flag, check_ignore_index, check_label_range, check_scalars, check_tensors
from .errors import UnsupportedDifferentiationError
from .reference import reference_rows


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

    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    with_cos = alpha > 0 or return_parts
    if logits.is_meta:  # shapes and dtypes only (see _meta.py)
        ce_rows, cos_rows, correct = meta_rows(flat_logits, cos_shared=(embedding,), with_cos=with_cos)
        return assemble(ce_rows, cos_rows, correct, labels, alpha=alpha, ignore_index=ignore_index,
                        reduction=reduction, shift=shift, return_parts=return_parts)
    loss = None
    if _grad_in_forward(grad_in_forward, reduction, return_parts, logits, embedding):
        ops = backends.resolve(backend, flat_logits, embedding)
        if ops is not None:
            loss, ce_rows, cos_rows, correct = kernel_loss(
                ops, flat_logits, flat_labels, embedding, temperature, _k(topk, vocab), ignore_index, with_cos, alpha,
                reduction, inplace_grad)
    if loss is None:
        ce_rows, cos_rows, correct = _rows(flat_logits, flat_labels, embedding, temperature, topk, ignore_index,
                                           with_cos=with_cos, backend=backend, inplace_grad=inplace_grad)
    return assemble(ce_rows, cos_rows, correct, labels, alpha=alpha, ignore_index=ignore_index,
                    reduction=reduction, shift=shift, return_parts=return_parts, loss=loss)


def _grad_in_forward(option, reduction, return_parts, logits, embedding) -> bool:
    """Whether this call computes the gradient in the forward (see ``mixed_loss``'s grad_in_forward)."""
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


def _k(topk, vocab: int) -> int:
    return vocab if topk is None else min(topk, vocab)


def assemble(ce_rows, cos_rows, correct, labels, *, alpha, ignore_index, reduction, shift, return_parts, loss=None):
    """The loss (or a :class:`MixedLossOutput`) from the per-position ce_n, cos_n and
    argmax == label of the flattened ``labels`` (already shifted when ``shift``); ``loss``,
    when given, is the reduced loss already computed (with its own gradient)."""
    valid = labels.reshape(-1) != ignore_index
    dist_rows, per_position = loss_rows(ce_rows, cos_rows, valid, alpha)
    n_valid = valid.sum()
    shape = labels.shape
    if loss is None:
        loss = _reduce(per_position, n_valid, reduction, shape, shift)
    if not return_parts:
        return loss
    return MixedLossOutput(
        loss=loss,
        ce=_reduce(ce_rows, n_valid, reduction, shape, shift),
        cos=_reduce(dist_rows, n_valid, reduction, shape, shift),
        n_valid=n_valid.detach(),
        n_correct=(correct & valid).sum().detach(),
        cos_sim_sum=torch.where(valid, cos_rows, torch.zeros_like(cos_rows)).sum().detach(),
    )


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[..., t + 1] at position t and ignore_index at the last: the causal shift
    without copying the logits (their last position is simply ignored)."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


_KERNEL_NAMES = {module: name for name, module in backends.KERNEL_MODULES.items()}


@assume_constant_result
def _resolved_name(backend: str, logits_device, logits_dtype, embedding_device, embedding_dtype) -> str:
    """The backend ``backends.resolve`` picks for tensors of these devices and dtypes, by name
    (run once per compilation: the choice is a constant of the graph)."""
    logits = torch.empty(1, 1, device=logits_device, dtype=logits_dtype)
    embedding = torch.empty(1, 1, device=embedding_device, dtype=embedding_dtype)
    ops = backends.resolve(backend, logits, embedding)
    return "reference" if ops is None else _KERNEL_NAMES[ops.__name__]


def _rows(logits, labels, embedding, temperature, topk, ignore_index, *, with_cos, backend, inplace_grad=False):
    k = _k(topk, logits.shape[-1])
    if torch.compiler.is_compiling():
        if inplace_grad:
            raise ValueError("inplace_grad: expected False under torch.compile (a traced graph may not write "
                             "over its inputs in the backward), got True")
        # traced: the choice depends on devices and dtypes only; the kernel is one custom-op node
        name = _resolved_name(backend, logits.device, logits.dtype, embedding.device, embedding.dtype)
        if name == "reference":
            return reference_rows(logits, labels, embedding, temperature, topk, ignore_index, with_cos)
        return compiled_kernel_rows(name, logits, labels, embedding, temperature, k, ignore_index, with_cos)
    ops = backends.resolve(backend, logits, embedding)
    if ops is None:
        if inplace_grad:
            logits = GradIntoLogits.apply(logits)
        return reference_rows(logits, labels, embedding, temperature, topk, ignore_index, with_cos)
    return kernel_rows(ops, logits, labels, embedding, temperature, k, ignore_index, with_cos, inplace_grad)


class GradIntoLogits(torch.autograd.Function):
    """Identity whose backward copies the incoming gradient into the input's storage and returns
    that storage: ``inplace_grad`` for the reference (same result, no memory saved)."""

    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a copy into the logits' storage has no graph
            raise UnsupportedDifferentiationError(
                "mixed_loss: inplace_grad=True writes the logits gradient over the logits, so it cannot be "
                "differentiated again (create_graph=True); pass inplace_grad=False for a higher-order gradient")
        (logits,) = ctx.saved_tensors
        with torch.no_grad():
            logits.copy_(grad)
        return logits


def _reduce(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str, shape, shift: bool) -> torch.Tensor:
    """Reduce per-position values; ``"none"`` keeps the labels' shape (less the last position when shifted)."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / n_valid.clamp_min(1).to(rows.dtype)
    per_position = rows.reshape(shape)
    return per_position[..., :-1] if shift else per_position
