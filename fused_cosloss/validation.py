"""Argument checks for the public API, run before any kernel sees the inputs.

Every check raises ``ValueError`` or ``TypeError`` naming the argument, what was
expected and what was given.
"""
from __future__ import annotations

import math
import numbers
import reprlib

import torch

from .backends import NAMES

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", *NAMES)


def check_scalars(alpha, temperature, topk, reduction, backend):
    """Check the scalar options of the loss; returns ``(alpha, temperature, topk)`` as Python
    numbers (float, float, int or None). Numbers of any kind are accepted (``numbers.Real`` /
    ``numbers.Integral``: numpy scalars too) and 0-d tensors on the CPU; bools are not."""
    alpha = real_number("alpha", alpha, "a number in [0, 1]")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    temperature = real_number("temperature", temperature, "a finite number > 0")
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if topk is not None:
        topk = integer("topk", topk, "an integer >= 1 or None")
        if topk < 1:
            raise ValueError(f"topk: expected an integer >= 1 or None, got {topk}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return alpha, temperature, topk


def real_number(name: str, value, expected: str) -> float:
    """``value`` as a float: any ``numbers.Real`` but a bool, or a 0-d real tensor on the CPU."""
    value = _host_scalar(name, value, expected)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected} (an int, a float, a numpy scalar or a 0-d CPU tensor), "
                        f"got {type(value).__name__}")
    return float(value)


def integer(name: str, value, expected: str) -> int:
    """``value`` as an int: any ``numbers.Integral`` but a bool, or a 0-d integer tensor on the CPU."""
    value = _host_scalar(name, value, expected)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {expected} (an int, a numpy integer or a 0-d integer CPU tensor), "
                        f"got {type(value).__name__}")
    return int(value)


def _host_scalar(name: str, value, expected: str):
    """The Python number a 0-d CPU tensor holds (other values are returned as they are)."""
    if not isinstance(value, torch.Tensor):
        return value
    problem = None
    if value.dim() != 0:
        problem = f"a tensor of shape {tuple(value.shape)}"
    elif value.device.type != "cpu":
        problem = f"a tensor on {value.device} (reading it would wait for the device: pass a number)"
    elif value.dtype == torch.bool or value.is_complex():
        problem = f"a {value.dtype} tensor"
    elif value.requires_grad:
        problem = "a tensor that requires grad (the loss is not differentiable in this option)"
    if problem is not None:
        raise TypeError(f"{name}: expected {expected} (a number, or a 0-d real tensor on the CPU), got {problem}")
    return value.item()


def check_flag(name: str, value, optional: bool = False) -> None:
    """A bool option (or None, when ``optional``): ``True``/``False`` themselves, not a truthy value."""
    if not isinstance(value, bool) and not (optional and value is None):
        expected = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name}: expected {expected}, got {reprlib.repr(value)} ({type(value).__name__})")


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
    ``torch.compile`` an asynchronous device-side assertion instead). Meta tensors have no
    values: nothing to check."""
    if labels.numel() == 0 or labels.is_meta:
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


def check_chunk_size(chunk_size):
    """Positions per chunk: an integer >= 1 (returned as an int) or None."""
    if chunk_size is None:
        return None
    chunk_size = integer("chunk_size", chunk_size, "an integer >= 1 or None")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1 or None, got {chunk_size}")
    return chunk_size


def check_ignore_index(ignore_index) -> int:
    """The label value that marks skipped positions: any integer (returned as an int)."""
    return integer("ignore_index", ignore_index, "an integer")


def check_loss_options(logit_scale, softcap, label_smoothing, z_loss):
    """Check the loss options of docs/spec.md ("Loss options"); returns them as Python numbers
    (``logit_scale`` and ``softcap`` may stay None: off)."""
    if logit_scale is not None:
        logit_scale = real_number("logit_scale", logit_scale, "a finite number > 0 or None")
        if not math.isfinite(logit_scale) or logit_scale <= 0.0:
            raise ValueError(f"logit_scale: expected a finite value > 0 or None, got {logit_scale}")
    if softcap is not None:
        softcap = real_number("softcap", softcap, "a finite number > 0 or None")
        if not math.isfinite(softcap) or softcap <= 0.0:
            raise ValueError(f"softcap: expected a finite value > 0 or None (no cap), got {softcap}")
    label_smoothing = real_number("label_smoothing", label_smoothing, "a number in [0, 1]")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    z_loss = real_number("z_loss", z_loss, "a finite number >= 0")
    if not math.isfinite(z_loss) or z_loss < 0.0:
        raise ValueError(f"z_loss: expected a finite value >= 0, got {z_loss}")
    return logit_scale, softcap, label_smoothing, z_loss


def check_weight(weight, labels: torch.Tensor, name: str = "weight") -> None:
    """The per-position weight: None, or a floating tensor of the labels' shape on their device."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected None or a floating torch.Tensor of the labels' shape (one weight per "
                        f"position), got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (one weight per position), got {weight.dtype}")
    if weight.shape != labels.shape:
        raise ValueError(f"{name}: expected the labels' shape {tuple(labels.shape)} (one weight per position; "
                         f"not per class), got {tuple(weight.shape)}")
    if weight.device != labels.device:
        raise ValueError(f"{name}: expected a tensor on the labels' device {labels.device}, got {weight.device}")
