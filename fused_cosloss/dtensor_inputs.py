"""``DTensor`` inputs (``torch.distributed.tensor``): the layouts FSDP2 and tensor parallelism hand
the loss, turned into plain local tensors and, where the vocabulary is sharded, a process group.

- ``embedding`` sharded on its rows (``Shard(0)``, a 1-D mesh) with plain logits: FSDP2's
  ``fully_shard`` outside the root's unsharded window (``reshard_after_forward=True``). Each rank's
  logits cover the whole vocabulary (data parallel), so the embedding is gathered for the call,
  and its gradient goes back to the shards by a reduce-scatter, divided by the mesh size as FSDP2
  averages the gradients of the parameters its own forward used.
- ``logits`` sharded on the vocabulary (``Shard(-1)``) with ``embedding`` sharded on its rows
  (``Shard(0)``) on the same 1-D mesh: the vocabulary-parallel layout (``vocab_parallel.py``), with
  the mesh's group as ``process_group``.
- Anything else (a multi-dimensional mesh, ``Partial``, logits sharded on the positions, a mix
  the loss cannot serve exactly) raises a ``ValueError`` naming the argument and the fix.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class PlainInputs(NamedTuple):
    logits: torch.Tensor
    embedding: torch.Tensor
    process_group: object
    vocab_start: int | None


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build of torch without distributed
        return None
    return DTensor


def is_dtensor(value) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def plain_labels(labels, name="labels"):
    """Labels given as a replicated ``DTensor`` (tensor parallel) as the local tensor."""
    if not is_dtensor(labels):
        return labels
    from torch.distributed.tensor import Replicate

    if any(placement != Replicate() for placement in labels.placements):
        raise ValueError(f"{name}: a DTensor is accepted replicated (every rank the same positions), got placements "
                         f"{labels.placements}; pass {name}.full_tensor()")
    return labels.to_local()


def plain_inputs(logits, embedding, process_group, vocab_start, *, logits_name="logits",
                 embedding_name="embedding") -> PlainInputs:
    """``mixed_loss``'s tensors as plain local tensors (unchanged when neither is a ``DTensor``)."""
    if not (is_dtensor(logits) or is_dtensor(embedding)):
        return PlainInputs(logits, embedding, process_group, vocab_start)
    from torch.distributed.tensor import Shard

    if process_group is not None or vocab_start is not None:
        raise ValueError(f"process_group: expected None with DTensor inputs (the mesh gives the layout), got "
                         f"{process_group!r}")
    for name, value in ((logits_name, logits), (embedding_name, embedding)):
        if is_dtensor(value) and value.device_mesh.ndim != 1:
            raise ValueError(f"{name}: expected a DTensor on a 1-D device mesh, got one on a {value.device_mesh.ndim}-D "
                             f"mesh {value.placements}; pass {name}.full_tensor() or a 1-D submesh's DTensor")
    if is_dtensor(logits):
        vocab_dim = Shard(logits.dim() - 1)
        if logits.placements[0] not in (vocab_dim, Shard(-1)):
            raise ValueError(f"{logits_name}: a DTensor is accepted sharded on the vocabulary (Shard(-1), tensor "
                             f"parallel), got placements {logits.placements}; pass {logits_name}.full_tensor() or "
                             f"redistribute it to Shard(-1)")
        if not (is_dtensor(embedding) and embedding.placements[0] == Shard(0)
                and embedding.device_mesh == logits.device_mesh):
            got = embedding.placements if is_dtensor(embedding) else "a plain tensor"
            raise ValueError(f"{embedding_name}: with {logits_name} sharded on the vocabulary, expected a DTensor "
                             f"sharded on its rows (Shard(0)) on the same mesh, got {got}")
        group = logits.device_mesh.get_group()
        return PlainInputs(logits.to_local(), embedding.to_local(), group, None)
    if embedding.placements[0] != Shard(0):
        raise ValueError(f"{embedding_name}: a DTensor is accepted sharded on its rows (Shard(0), as FSDP2 shards "
                         f"it) or with {logits_name} sharded on the vocabulary, got placements {embedding.placements}; "
                         f"pass {embedding_name}.full_tensor()")
    return PlainInputs(logits, gathered_rows(embedding), None, None)


def gathered_if_sharded(name: str, table):
    """``linear_mixed_loss``'s LM head weight, bias or embedding: a ``DTensor`` sharded on its rows
    (FSDP2's layout; under tensor parallel too, where every rank then computes the whole loss) is
    gathered (see ``gathered_rows``); a plain tensor or None is returned as it is."""
    if not is_dtensor(table):
        return table
    from torch.distributed.tensor import Shard

    if table.device_mesh.ndim != 1 or table.placements[0] != Shard(0):
        raise ValueError(f"{name}: a DTensor is accepted sharded on its rows (Shard(0)) on a 1-D mesh, as FSDP2 "
                         f"shards it, got placements {table.placements} on a {table.device_mesh.ndim}-D mesh; pass "
                         f"{name}.full_tensor(), or the local shards with process_group for the vocabulary-parallel "
                         f"layout")
    return gathered_rows(table)


def gathered_rows(embedding) -> torch.Tensor:
    """The whole table of an embedding sharded on its rows, as a plain tensor whose gradient is
    reduce-scattered back to the shards and divided by the mesh size (FSDP2's average)."""
    from torch.distributed.tensor import Partial, Replicate

    size = embedding.device_mesh.size()
    whole = embedding.redistribute(embedding.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("sum")])
    return _ScaleGradient.apply(whole, 1.0 / size)


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward; the gradient times ``factor``."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None
