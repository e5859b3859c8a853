"""``linear_mixed_loss``: the mixed loss from hidden states, without materialising the logits."""
from __future__ import annotations

import functools

import torch

from . import backends, compiler_marks
from .autograd import kernel_layouts
from .linear_autograd import LinearMixedLossFunction, LinearMixedRowsFunction
from .meta import meta_rows
from .options import LossOptions
from .validation import (check_chunk_size, check_flag, check_ignore_index, check_label_range, check_linear_tensors,
                         check_loss_options, check_scalars, check_weight)
from .functional import assemble, mixed_loss, shift_labels, shift_weight
from .dtensor_inputs import gathered_if_sharded, plain_labels
from .vocab_parallel import check_process_group, copy_to_shards

# Default chunk: about this many logits at a time (V = 50257: 333 rows on CPU, 1335 on CUDA).
CPU_CHUNK_ELEMENTS = 2**24
CUDA_CHUNK_ELEMENTS = 2**26


def linear_mixed_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    embedding: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
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
    position_weight: torch.Tensor | None = None,
    backend: str = "auto",
    return_parts: bool = False,
    chunk_size: int | None = None,
    process_group=None,
    vocab_start: int | None = None,
):
    """``mixed_loss(hidden @ weight.T + bias, labels, embedding)`` without the ``[N, V]`` logits.

    The logits exist one chunk of ``chunk_size`` positions at a time. With
    ``reduction="mean"`` or ``"sum"`` and inputs that require grad, the gradients are
    computed in the forward (each chunk's logits gradient is written over the chunk and
    turned into the hidden / weight / bias gradients at once): the backward costs nothing
    more, and the ``.ce`` / ``.cos`` parts of ``return_parts`` are for reading, not for
    differentiating, and a second backward or one with ``create_graph=True`` raises
    :class:`~fused_cosloss.UnsupportedDifferentiationError`. With ``reduction="none"`` the
    backward recomputes each chunk's logits: it can run again, and with ``create_graph=True``
    it builds a differentiable graph (through the reference's formulation, at its cost).
    Weight, bias and embedding gradients are summed over the chunks in float32 and rounded
    to the inputs' dtype once. Peak extra memory is about one or two chunks of logits,
    float32 accumulators of weight's (and bias's, embedding's) size and the gradient of
    hidden, plus, for ``"none"``, O(N * (K + H)) saved per position.

    Args:
        hidden: ``[..., H]`` float32, bfloat16, float16 (or float64), e.g. the last hidden
            states of a causal LM's base model.
        weight: ``[V, H]`` LM head weight, the dtype of ``hidden``.
        labels: integer, the leading shape of ``hidden``.
        embedding: ``[V, H_e]`` token embedding of the cosine term; None (the default) uses
            ``weight`` (tied embeddings), and its gradient then adds to ``weight``'s.
        bias: ``[V]`` LM head bias or None.
        logit_scale, softcap: applied to the logits ``hidden @ weight.T + bias`` as they are
            computed (the model's ``logit_scale`` / ``1 / logits_scaling`` and
            ``final_logit_softcapping``), by the kernel, chunk by chunk.
        position_weight: the per-position weight ``mixed_loss`` calls ``weight`` (here ``weight``
            is the LM head's).
        chunk_size: positions per chunk; None takes about 2**24 logits per chunk on CPU and
            2**26 on CUDA.
        process_group, vocab_start: the LM head (and the embedding) sharded by vocabulary rows
            across the group's processes, as in :func:`fused_cosloss.mixed_loss`; ``hidden`` is
            whole on every rank and its gradient is summed over the ranks. This layout computes
            the shard's ``[N, V_r]`` logits at once (no chunks), then the loss on them.
            A ``weight`` (``bias``, ``embedding``) that is a ``DTensor`` sharded on its rows, as
            FSDP2 shards it, is gathered for the call instead (see ``dtensor_inputs.py``).
        The other arguments are those of :func:`fused_cosloss.mixed_loss`.

    Returns:
        What :func:`fused_cosloss.mixed_loss` returns on the logits ``hidden @ weight.T + bias``.
    """
    alpha, temperature, topk = check_scalars(alpha, temperature, topk, reduction, backend)
    logit_scale, softcap, label_smoothing, z_loss = check_loss_options(logit_scale, softcap, label_smoothing, z_loss)
    ignore_index = check_ignore_index(ignore_index)
    check_flag("shift", shift)
    check_flag("return_parts", return_parts)
    weight, bias, embedding = (gathered_if_sharded(name, table) for name, table in
                               (("weight", weight), ("bias", bias), ("embedding", embedding)))
    hidden, labels = plain_labels(hidden, "hidden"), plain_labels(labels)
    check_linear_tensors(hidden, weight, labels, embedding, bias, shift)
    check_weight(position_weight, labels, name="position_weight")
    chunk_size = check_chunk_size(chunk_size)
    check_process_group(process_group, vocab_start)
    if process_group is not None and not hidden.is_meta:
        logits = torch.nn.functional.linear(copy_to_shards(hidden, process_group), weight, bias)
        return mixed_loss(logits, labels, weight if embedding is None else embedding, alpha=alpha,
                          temperature=temperature, topk=topk, ignore_index=ignore_index, reduction=reduction,
                          shift=shift, logit_scale=logit_scale, softcap=softcap, label_smoothing=label_smoothing,
                          z_loss=z_loss, weight=position_weight, backend=backend, return_parts=return_parts,
                          process_group=process_group, vocab_start=vocab_start)
    vocab = weight.shape[0]
    if shift:
        labels = shift_labels(labels, ignore_index)
        position_weight = None if position_weight is None else shift_weight(position_weight)
    check_label_range(labels, vocab, ignore_index)
    options = LossOptions.resolve(temperature=temperature, topk=topk, vocab=vocab, ignore_index=ignore_index,
                                  with_cos=alpha > 0 or return_parts, logit_scale=logit_scale, softcap=softcap,
                                  label_smoothing=label_smoothing)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_weight = None if position_weight is None else position_weight.reshape(-1)
    finish = functools.partial(assemble, labels=labels, weight=flat_weight, alpha=alpha, z_loss=z_loss,
                               ignore_index=ignore_index, reduction=reduction, shift=shift, return_parts=return_parts)
    if hidden.is_meta:  # shapes and dtypes only (see meta.py)
        return finish(*meta_rows(flat_hidden, shared=[t for t in (weight, bias) if t is not None],
                                 cos_shared=[embedding] if embedding is not None else [], with_cos=options.with_cos))
    loss, *terms = _chunked_terms(
        flat_hidden, weight, bias, embedding, labels.reshape(-1), options, backend=backend, chunk_size=chunk_size,
        alpha=alpha, reduction=reduction, z_loss=z_loss, position_weight=flat_weight)
    return finish(*terms, loss=loss)


def default_chunk_size(n: int, vocab: int, device: torch.device) -> int:
    """Positions per chunk so that a chunk holds about CPU/CUDA_CHUNK_ELEMENTS logits."""
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, min(n, budget // vocab))


@compiler_marks.disable
def _chunked_terms(hidden, weight, bias, embedding, labels, options: LossOptions, *, backend, chunk_size, alpha,
                   reduction, z_loss, position_weight):
    """(loss or None, ce, cos, correct, lse) per position; the loss when it was computed with its gradient
    (not for a position weight that requires grad: the loss is then assembled by autograd from the rows)."""
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    table = weight if embedding is None else embedding
    # the chunk logits have hidden's dtype and device: the backend is chosen for them
    ops = backends.resolve(backend, hidden, table).ops
    _, labels, table = kernel_layouts(hidden, labels, table)
    embedding = None if embedding is None else table
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    args = (hidden, weight, bias, embedding, labels, ops, options, int(chunk))
    differentiable = [t for t in (hidden, weight, bias, embedding) if t is not None and t.requires_grad]
    weight_grad = position_weight is not None and position_weight.requires_grad
    if reduction != "none" and differentiable and torch.is_grad_enabled() and not weight_grad:
        return LinearMixedLossFunction.apply(*args, float(alpha), reduction, float(z_loss), position_weight)
    return (None, *LinearMixedRowsFunction.apply(*args))
