"""``mixed_loss``: next-token cross-entropy mixed with a cosine distance in embedding space."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import backends, compiler_marks
from .autograd import GradIntoLogitsFunction, kernel_loss, kernel_rows
from .backends import Backend
from .compile_ops import compiled_kernel_rows
from .dtensor_inputs import plain_inputs, plain_labels
from .loss_math import effective_weight, loss_rows, mean_divisor, reduce_positions
from .meta import meta_rows
from .options import LossOptions
from .reference import reference_rows
from .validation import (check_flag, check_ignore_index, check_label_range, check_loss_options, check_scalars,
                         check_tensors, check_weight)
from .vocab_parallel import VocabShard, check_process_group, resolve_shard, vocab_parallel_rows


class MixedLossOutput(NamedTuple):
    """The loss with its parts and the counts evaluation needs (no logits kept).

    ``loss == alpha * cos + (1 - alpha) * ce + z_loss``; ``ce``, ``cos`` (the distance
    1 - cos_n) and ``z_loss`` (zeta * lse_n^2; zero without the option) use the loss's
    reduction and weights. ``n_valid``, ``n_correct`` (argmax == label) and ``cos_sim_sum``
    (summed cosine similarity) are unweighted sums over valid positions, detached from the graph.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    cos: torch.Tensor
    n_valid: torch.Tensor
    n_correct: torch.Tensor
    cos_sim_sum: torch.Tensor
    z_loss: torch.Tensor


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
    logit_scale: float | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
    return_parts: bool = False,
    inplace_grad: bool = False,
    grad_in_forward: bool | None = None,
    process_group=None,
    vocab_start: int | None = None,
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
        logit_scale: s > 0 multiplying every logit first (Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``); None: 1.
        softcap: c > 0: every (scaled) logit x becomes ``c * tanh(x / c)`` before anything else
            (Gemma 2/3's ``final_logit_softcapping``), never stored as a second ``[N, V]`` by the
            kernels; None: no cap. Pass it only for logits the model has not capped already.
        label_smoothing: epsilon in [0, 1]: the CE part is ``F.cross_entropy(label_smoothing=epsilon)``'s
            (the cosine target stays the gold token).
        z_loss: zeta >= 0: adds ``zeta * logsumexp(z'_n) ** 2`` per valid position (PaLM's z-loss).
        weight: per-position loss weights of the labels' shape (float), or None; ``"mean"`` then
            divides by the sum of the valid positions' weights (see docs/spec.md, "Loss options").
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
            logits are overwritten by the call itself. Ignored by the reference backend, under
            ``torch.compile`` and with ``process_group``.
        process_group: a ``torch.distributed`` group across which the vocabulary is sharded
            (tensor parallel): ``logits`` ``[..., V_r]`` and ``embedding`` ``[V_r, H]`` are this
            rank's contiguous range of it, the labels (global indices) are the same on every rank,
            and every rank returns the loss of the whole vocabulary; its backward gives each rank
            its shards' gradients (every rank must run the backward of that same loss). Every
            backend takes it. None: the whole vocabulary is here. See docs/vocab_parallel.md.
        vocab_start: with ``process_group``, the global index of this rank's first vocabulary
            row; None places the shards in rank order.

    ``DTensor`` inputs: an embedding sharded on its rows by FSDP2 (``fully_shard``) is gathered
    for the call; logits sharded on the vocabulary with the embedding sharded on its rows (one
    mesh) take the vocabulary-parallel layout; other layouts raise (see ``dtensor_inputs.py``).

    Returns:
        The loss (a scalar, or the per-position values for ``"none"``: 0 at ignored
        positions) in float32 (float64 for float64 logits), or a :class:`MixedLossOutput`.
    """
    alpha, temperature, topk = check_scalars(alpha, temperature, topk, reduction, backend)
    logit_scale, softcap, label_smoothing, z_loss = check_loss_options(logit_scale, softcap, label_smoothing, z_loss)
    ignore_index = check_ignore_index(ignore_index)
    logits, embedding, process_group, vocab_start = plain_inputs(logits, embedding, process_group, vocab_start)
    labels = plain_labels(labels)
    for name, flag in (("shift", shift), ("return_parts", return_parts), ("inplace_grad", inplace_grad)):
        check_flag(name, flag)
    check_flag("grad_in_forward", grad_in_forward, optional=True)
    check_tensors(logits, labels, embedding, shift)
    check_weight(weight, labels)
    check_process_group(process_group, vocab_start)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits: expected a vocabulary size V >= 1, got shape {tuple(logits.shape)}")
    if shift:
        labels = shift_labels(labels, ignore_index)
        weight = None if weight is None else shift_weight(weight)
    shard = None
    if process_group is not None and not logits.is_meta:
        shard = _vocab_shard(process_group, vocab_start, logits, labels, ignore_index)
    whole_vocab = vocab if shard is None else shard.vocab
    check_label_range(labels, whole_vocab, ignore_index)
    if inplace_grad and torch.compiler.is_compiling():
        raise ValueError("inplace_grad: expected False under torch.compile (a traced graph may not write "
                         "over its inputs in the backward), got True")
    gradient_now = _grad_in_forward(grad_in_forward, reduction, return_parts, logits, embedding, weight)

    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    flat_weight = None if weight is None else weight.reshape(-1)
    options = LossOptions.resolve(temperature=temperature, topk=topk, vocab=whole_vocab, ignore_index=ignore_index,
                                  with_cos=alpha > 0 or return_parts, logit_scale=logit_scale, softcap=softcap,
                                  label_smoothing=label_smoothing)
    finish = functools.partial(assemble, labels=labels, weight=flat_weight, alpha=alpha, z_loss=z_loss,
                               ignore_index=ignore_index, reduction=reduction, shift=shift, return_parts=return_parts)
    if logits.is_meta:  # shapes and dtypes only (see meta.py)
        return finish(*meta_rows(flat_logits, cos_shared=(embedding,), with_cos=options.with_cos))
    if shard is not None:
        chosen = backends.resolve(backend, flat_logits, embedding)
        if inplace_grad:
            flat_logits = GradIntoLogitsFunction.apply(flat_logits)
        ops = chosen.ops if chosen.is_kernel else None
        return finish(*vocab_parallel_rows(flat_logits, flat_labels, embedding, options, shard, ops))
    chosen = backends.resolve(backend, flat_logits, embedding)
    if gradient_now and chosen.is_kernel:
        loss, *terms = kernel_loss(chosen.ops, flat_logits, flat_labels, embedding, options, alpha=alpha,
                                   reduction=reduction, inplace_grad=inplace_grad, z_loss=z_loss, weight=flat_weight)
        return finish(*terms, loss=loss)
    return finish(*position_terms(chosen, flat_logits, flat_labels, embedding, options, inplace_grad=inplace_grad))


@compiler_marks.disable
def _vocab_shard(process_group, vocab_start, logits, labels, ignore_index) -> VocabShard:
    """This rank's shard of the vocabulary, checked against the other ranks' (eager under
    ``torch.compile``: a graph break, as the collectives of ``vocab_parallel_rows`` are)."""
    rows = labels.numel()
    valid = int((labels != ignore_index).sum()) if rows else 0
    return resolve_shard(process_group, vocab_start, logits.shape[-1], rows, valid, logits.device)


def position_terms(backend: Backend, logits, labels, embedding, options: LossOptions, *, inplace_grad=False):
    """``(ce, cos, correct, lse)`` per position of ``logits [N, V]`` on the chosen backend: the reference
    differentiated by autograd, a kernel through its autograd Function, or, while ``torch.compile``
    traces, through its custom op (one opaque node of the graph)."""
    if not backend.is_kernel:
        if inplace_grad:
            logits = GradIntoLogitsFunction.apply(logits)
        return reference_rows(logits, labels, embedding, options)
    if torch.compiler.is_compiling():
        return compiled_kernel_rows(backend.name, logits, labels, embedding, options)
    return kernel_rows(backend.ops, logits, labels, embedding, options, inplace_grad=inplace_grad)


def _grad_in_forward(option, reduction, return_parts, logits, embedding, weight=None) -> bool:
    """Whether this call computes the gradient in the forward where a kernel backend runs (see
    ``mixed_loss``'s grad_in_forward)."""
    if option is False:
        return False
    if option and reduction == "none":
        raise ValueError("grad_in_forward: expected reduction 'mean' or 'sum' (a scalar loss whose gradient the "
                         "forward can compute), got reduction='none'")
    weight_grad = weight is not None and weight.requires_grad and torch.is_grad_enabled()
    if option and weight_grad:
        raise ValueError("grad_in_forward: the gradient computed in the forward has none for a weight that requires "
                         "grad; pass grad_in_forward=False (or None) or weight.detach()")
    if weight_grad:
        return False
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled() or not (logits.requires_grad or embedding.requires_grad):
        return False
    return bool(option) or (reduction != "none" and not return_parts)


def assemble(ce_rows, cos_rows, correct, lse_rows, *, labels, weight, alpha, z_loss, ignore_index, reduction, shift,
             return_parts, loss=None):
    """The loss (or a :class:`MixedLossOutput`) from the per-position ce_n, cos_n, argmax == label and
    lse_n of the flattened ``labels`` (already shifted when ``shift``) and ``weight``; ``loss``, when
    given, is the reduced loss already computed (with its own gradient)."""
    valid = labels.reshape(-1) != ignore_index
    weight = effective_weight(valid, weight, ce_rows.dtype)
    rows = loss_rows(ce_rows, cos_rows, lse_rows, valid, alpha, z_loss=z_loss, weight=weight)
    n_valid = valid.sum()
    divisor = mean_divisor(valid, weight, ce_rows.dtype)
    shape = labels.shape
    if loss is None:
        loss = reduce_positions(rows.loss, divisor, reduction, shape, shift)
    if not return_parts:
        return loss
    return MixedLossOutput(
        loss=loss,
        ce=reduce_positions(rows.ce, divisor, reduction, shape, shift),
        cos=reduce_positions(rows.dist, divisor, reduction, shape, shift),
        n_valid=n_valid.detach(),
        n_correct=(correct & valid).sum().detach(),
        cos_sim_sum=torch.where(valid, cos_rows, torch.zeros_like(cos_rows)).sum().detach(),
        z_loss=reduce_positions(rows.z_loss, divisor, reduction, shape, shift),
    )


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[..., t + 1] at position t and ignore_index at the last: the causal shift
    without copying the logits (their last position is simply ignored)."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def shift_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight[..., t + 1] at position t (the weight goes with the label it weighs) and 0 at the last."""
    return torch.cat([weight[..., 1:], torch.zeros_like(weight[..., :1])], dim=-1)
