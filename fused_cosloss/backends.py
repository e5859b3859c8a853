"""Choosing the backend that computes the loss.

``"auto"`` takes Triton on CUDA tensors and the native C++ kernel on CPU when it is
built, else the reference. A backend named explicitly either runs or raises a
``RuntimeError`` saying why; it never falls back silently. :func:`resolve` makes that
choice once per call and returns a :class:`Backend` that names it.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import NamedTuple

import torch

from .compiler_marks import assume_constant_result

KERNEL_MODULES = {"native": "fused_cosloss.native", "triton": "fused_cosloss.triton_ops"}
NAMES = ("reference", *KERNEL_MODULES)
_warned: set[str] = set()


class Backend(NamedTuple):
    """The backend chosen for a call: its name and the module implementing the protocol of
    ``protocol.py`` (for the reference, ``reference_backend``, which the fused-linear mode drives
    chunk by chunk; ``mixed_loss`` differentiates the reference itself)."""

    name: str
    ops: ModuleType

    @property
    def is_kernel(self) -> bool:
        return self.name != "reference"


_BACKENDS: dict[str, Backend] = {}  # by name, once imported


def kernel_ops(name: str) -> ModuleType:
    """The ops module of kernel backend ``name``; RuntimeError saying why when it cannot be imported."""
    module, reason = _kernel_module(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return module


def _kernel_module(name: str):
    """Import the ops module of a kernel backend; (module, None) or (None, reason)."""
    try:
        return importlib.import_module(KERNEL_MODULES[name]), None
    except ImportError as error:  # an optional dependency (triton, a compiler) is missing
        return None, f"cannot import {KERNEL_MODULES[name]}: {error}"


def _backend(name: str) -> Backend:
    if name not in _BACKENDS:
        if name == "reference":
            from . import reference_backend

            _BACKENDS[name] = Backend("reference", reference_backend)
        else:
            _BACKENDS[name] = Backend(name, kernel_ops(name))
    return _BACKENDS[name]


def why_unavailable(name: str, logits: torch.Tensor, embedding: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on these tensors, or None when it can."""
    if name == "reference":
        return None
    module, reason = _kernel_module(name)
    if module is None:
        return reason
    return module.unavailable_reason(logits, embedding)


def resolve(name: str, logits: torch.Tensor, embedding: torch.Tensor) -> Backend:
    """The backend ``name`` (``"auto"`` or one of ``NAMES``) stands for on these tensors.

    Under ``torch.compile`` the choice depends on devices and dtypes only and is made once per
    compilation (a constant of the graph)."""
    if torch.compiler.is_compiling():
        # a lookup only: _traced_choice ran eagerly and imported the backend
        return _BACKENDS[_traced_choice(name, logits.device, logits.dtype, embedding.device, embedding.dtype)]
    return _backend(_choice(name, logits, embedding))


def _choice(name: str, logits: torch.Tensor, embedding: torch.Tensor) -> str:
    if name == "auto":
        choice = "triton" if logits.device.type == "cuda" else "native"
        reason = why_unavailable(choice, logits, embedding)
        if reason is None:
            return choice
        _warn_once(f"{choice}:{reason}", f"fused_cosloss: backend='auto' uses the reference because {choice} cannot run: {reason}")
        return "reference"
    reason = why_unavailable(name, logits, embedding)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    return name


@assume_constant_result
def _traced_choice(name: str, logits_device, logits_dtype, embedding_device, embedding_dtype) -> str:
    """``_choice`` for tensors of these devices and dtypes (run once per compilation)."""
    logits = torch.empty(1, 1, device=logits_device, dtype=logits_dtype)
    embedding = torch.empty(1, 1, device=embedding_device, dtype=embedding_dtype)
    return _backend(_choice(name, logits, embedding)).name


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on tensors of this device and dtype."""
    probe = torch.empty(1, 1, device=device, dtype=dtype)
    return [name for name in NAMES if why_unavailable(name, probe, probe) is None]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)
