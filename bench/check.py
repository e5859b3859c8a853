"""Checking an implementation against the reference on the benchmark's own inputs.

Loss: relative error. Gradients: the largest absolute difference divided by the largest
absolute reference value (a scale-free error that a wrong formula, a missed term or a
wrong top-k set pushes to order one). Tolerances depend on the input dtype.
"""
from __future__ import annotations

import math

import torch

# (loss relative error, gradient error) per input dtype
TOLERANCES = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (5e-3, 2e-2),
}


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    loss_tol, grad_tol = TOLERANCES[dtype]
    return loss_tol * scale, grad_tol * scale


def loss_and_grads(fn, inputs: dict, leaves: tuple[str, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    """Run ``fn`` forward and backward on fresh leaf copies of ``inputs``; the loss and float32
    gradients of ``leaves`` in their own dtype (never the caller's tensors: some implementations
    overwrite theirs)."""
    local = {name: value.detach().clone() for name, value in inputs.items()}
    for name in leaves:
        local[name].requires_grad_(True)
    loss = fn(local)
    loss.backward()
    grads = {}
    for name in leaves:
        grad = local[name].grad
        grads[name] = torch.zeros_like(local[name]) if grad is None else grad.detach()
    value = float(loss.detach().float())
    del local, loss
    return value, grads


def compare(loss: float, grads: dict, ref_loss: float, ref_grads: dict, dtype: torch.dtype, scale: float = 1.0) -> dict:
    """The check's record: errors, tolerances and ``passed``."""
    loss_tol, grad_tol = tolerances(dtype, scale)
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-6) if math.isfinite(loss) else math.inf
    grad_errs = {}
    for name, ref in ref_grads.items():
        got = grads[name]
        if got.shape != ref.shape:
            grad_errs[name] = math.inf
            continue
        diff, largest = _max_abs_diff(got, ref)
        grad_errs[name] = diff / max(largest, 1e-30) if math.isfinite(diff) else math.inf
    passed = loss_err <= loss_tol and all(err <= grad_tol for err in grad_errs.values())
    return {
        "passed": passed,
        "loss": loss,
        "loss_ref": ref_loss,
        "loss_rel_err": loss_err,
        "grad_err": grad_errs,
        "tol_loss": loss_tol,
        "tol_grad": grad_tol,
    }


def _max_abs_diff(got: torch.Tensor, ref: torch.Tensor, rows: int = 4096) -> tuple[float, float]:
    """max |got - ref| and max |ref| in float32, a block of rows at a time (no full-size temporaries)."""
    diff, largest = 0.0, 0.0
    got, ref = got.reshape(got.shape[0], -1), ref.reshape(ref.shape[0], -1)
    for start in range(0, ref.shape[0], rows):
        r = ref[start : start + rows].float()
        g = got[start : start + rows].float()
        if r.numel():
            diff = max(diff, float((g - r).abs().max()))
            largest = max(largest, float(r.abs().max()))
            if not bool(torch.isfinite(g).all()):
                return math.inf, largest
    return diff, largest
