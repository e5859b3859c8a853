"""Choosing the backend that computes the loss.

``"auto"`` takes Triton on CUDA tensors and the native C++ kernel on CPU when it is
built, else the reference. A backend named explicitly either runs or raises a
``RuntimeError`` saying why; it never falls back silently.
"""
from __future__ import annotations

import importlib
import warnings

import torch

KERNEL_MODULES = {"native": "fused_cosloss.native", "triton": "fused_cosloss.triton_ops"}
_warned: set[str] = set()


def _kernel_module(name: str):
    """Import the ops module of a kernel backend; (module, None) or (None, reason)."""
    try:
        return importlib.import_module(KERNEL_MODULES[name]), None
    except ImportError as error:  # an optional dependency (triton, a compiler) is missing
        return None, f"cannot import {KERNEL_MODULES[name]}: {error}"


def why_unavailable(name: str, logits: torch.Tensor, embedding: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on these tensors, or None when it can."""
    if name == "reference":
        return None
    module, reason = _kernel_module(name)
    if module is None:
        return reason
    return module.unavailable_reason(logits, embedding)


def _auto_choice(logits: torch.Tensor) -> str:
    return "triton" if logits.device.type == "cuda" else "native"


def resolve(name: str, logits: torch.Tensor, embedding: torch.Tensor):
    """The ops module for backend ``name`` on these tensors, or None for the reference."""
    if name == "reference":
        return None
    if name == "auto":
        choice = _auto_choice(logits)
        reason = why_unavailable(choice, logits, embedding)
        if reason is None:
            return _kernel_module(choice)[0]
        _warn_once(f"{choice}:{reason}", f"fused_cosloss: backend='auto' uses the reference because {choice} cannot run: {reason}")
        return None
    reason = why_unavailable(name, logits, embedding)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return _kernel_module(name)[0]


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on tensors of this device and dtype."""
    probe = torch.empty(1, 1, device=device, dtype=dtype)
    return [name for name in ("reference", "native", "triton") if why_unavailable(name, probe, probe) is None]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
