"""Argument checks for the public API, run before any kernel sees the inputs.

Every check raises ``ValueError`` or ``TypeError`` naming the argument, what was
expected and what was given.
"""
from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "native", "triton")


def check_scalars(alpha, temperature, topk, reduction, backend) -> None:
    """Check the scalar options of the loss."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float in [0, 1], got {type(alpha).__name__}")
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a positive float, got {type(temperature).__name__}")
    if not math.isfinite(float(temperature)) or float(temperature) <= 0.0:
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise TypeError(f"topk: expected an int >= 1 or None, got {type(topk).__name__}")
        if topk < 1:
            raise ValueError(f"topk: expected an int >= 1 or None, got {topk}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def check_flag(name: str, value, optional: bool = False) -> None:
    """A bool option (or None, when ``optional``)."""
    if not isinstance(value, bool) and not (optional and value is None):
        expected = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")


def check_tensors(logits, labels, embedding, shift: bool) -> None:
    """Check types, dtypes, shapes and devices of the tensor arguments."""
    for name, value in (("logits", logits), ("labels", labels), ("embedding", embedding)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating dtype (float32, bfloat16, float16, float64), got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype (int64, int32, ...), got {labels.dtype}")
    if not embedding.is_floating_point():
        raise TypeError(f"embedding: expected a floating dtype, got {embedding.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"logits: expected shape [..., V], got a 0-d tensor")
    if embedding.dim() != 2:
        raise ValueError(f"embedding: expected a 2-D [V, H] tensor, got shape {tuple(embedding.shape)}")
    vocab = logits.shape[-1]
    if embedding.shape[0] != vocab:
        raise ValueError(
            f"embedding: expected {vocab} rows (the logits' vocabulary size V), got shape {tuple(embedding.shape)}"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (the leading shape of logits {tuple(logits.shape)}), "
            f"got {tuple(labels.shape)}"
        )
    if shift and logits.dim() < 3:
        raise ValueError(
            f"logits: shift=True expects shape [B, T, V] (it compares logits[:, :-1] with labels[:, 1:]), "
            f"got {tuple(logits.shape)}"
        )
    devices = {logits.device, labels.device, embedding.device}
    if len(devices) != 1:
        raise ValueError(
            f"logits, labels, embedding: expected tensors on one device, got logits on {logits.device}, "
            f"labels on {labels.device}, embedding on {embedding.device}"
        )


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Check that every label is in [0, V) or equal to ignore_index (one device sync; under
    ``torch.compile`` an asynchronous device-side assertion instead)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():
        # traced: no host sync and no Python branch on a tensor value; the check runs on the device
        # (a RuntimeError when the step runs; without the offending value)
        torch._assert_async(
            torch.logical_not(bad.any()), f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {first}"
        )


def check_linear_tensors(hidden, weight, labels, embedding, bias, shift: bool) -> None:
    """Check the tensor arguments of the fused-linear loss (``embedding`` and ``bias`` may be None)."""
    named = (("hidden", hidden), ("weight", weight), ("labels", labels))
    optional = tuple((name, t) for name, t in (("embedding", embedding), ("bias", bias)) if t is not None)
    for name, value in named + optional:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    for name, value in (("hidden", hidden), ("weight", weight)) + optional:
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16, float64), got {value.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype (int64, int32, ...), got {labels.dtype}")
    for name, value in (("weight", weight),) + tuple((n, t) for n, t in optional if n == "bias"):
        if value.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected the dtype of hidden ({hidden.dtype}), got {value.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected a 2-D [V, H] tensor with H = {hidden.shape[-1]} (the last dim of hidden), "
            f"got shape {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError(f"weight: expected a vocabulary size V >= 1, got shape {tuple(weight.shape)}")
    if embedding is not None and (embedding.dim() != 2 or embedding.shape[0] != vocab):
        raise ValueError(
            f"embedding: expected a 2-D [V, H] tensor with V = {vocab} (the rows of weight), "
            f"got shape {tuple(embedding.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias: expected shape ({vocab},) (the rows of weight), got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (the leading shape of hidden {tuple(hidden.shape)}), "
            f"got {tuple(labels.shape)}")
    if shift and hidden.dim() < 3:
        raise ValueError(
            f"hidden: shift=True expects shape [B, T, H] (position t predicts labels[:, t + 1]), "
            f"got {tuple(hidden.shape)}")
    tensors = named + optional
    if len({t.device for _, t in tensors}) != 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors)
        raise ValueError(f"{', '.join(name for name, _ in tensors)}: expected tensors on one device, got {where}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int >= 1 or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size}")
