"""The kernel backends as ``torch.library`` custom ops, for ``torch.compile``.

``torch.compile`` cannot trace into a C++ extension or a Triton launch wrapped in a Python
``autograd.Function``; these ops make each kernel backend one opaque node of the graph, with

* ``fused_cosloss::rows_forward(backend, logits, labels, embedding, *options) -> Tensor[]``:
  ``[ce, cos, correct, lse, *saved]``, where ``options`` are the ``LossOptions`` fields
  (``as_schema_args``) and ``saved`` is the backend's saved state, of a fixed arity per
  (backend, with_cos);
* ``fused_cosloss::rows_backward(backend, logits, labels, embedding, saved, grad_ce, grad_cos,
  grad_lse, *options, need_logits_grad, need_embedding_grad) -> Tensor[]``:
  ``[dlogits, dembedding]``, an empty tensor standing for a gradient that is not needed
  (``grad_lse`` None when nothing differentiates lse);

fake (meta) implementations from each backend's ``fake_forward_rows`` (shapes and dtypes
only), and an autograd registration that calls ``rows_backward``. ``backend`` names the
kernel module (``"native"`` or ``"triton"``), never ``"auto"``: it is resolved before; the
traced call names it with the version of its saved state's layout (``"triton/4"``,
``SAVED_LAYOUTS``), so that a compiled graph cached on disk by an earlier version of the
package, whose saved state had another layout, is not reused (inductor's cache key holds the
op's arguments, not its fake kernel).

Eager calls keep going through :class:`fused_cosloss.autograd.KernelRowsFunction` (no
dispatcher overhead); these ops run the same ``forward_rows`` / ``backward_rows``. The op
schemas hold primitives, so the :class:`~fused_cosloss.options.LossOptions` fields travel
apart here and are put together again before a backend is called.
"""

from typing import List, Optional

import torch

from . import backends
from .autograd import kernel_layouts
from .options import LossOptions


# Bump a backend's number whenever its forward_rows changes the saved state's arity, shapes or dtypes.
SAVED_LAYOUTS = {"native": 3, "triton": 5}


def _ops(backend: str):
    return backends.kernel_ops(backend.split("/")[0])


@torch.library.custom_op("fused_cosloss::rows_forward", mutates_args=())
def rows_forward(
    backend: str, logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, temperature: float, k: int,
    ignore_index: int, with_cos: bool, logit_scale: float, softcap: float, label_smoothing: float,
) -> List[torch.Tensor]:
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    options = LossOptions.from_schema_args(temperature, k, ignore_index, with_cos, logit_scale, softcap,
                                           label_smoothing)
    ce, cos, correct, lse, saved = _ops(backend).forward_rows(logits, labels, embedding, options)
    return [ce, cos, correct, lse, *saved]


@rows_forward.register_fake
def _rows_forward_fake(backend, logits, labels, embedding, *schema_options):
    ce, cos, correct, lse, saved = _ops(backend).fake_forward_rows(
        logits, labels, embedding, LossOptions.from_schema_args(*schema_options))
    return [ce, cos, correct, lse, *saved]


@torch.library.custom_op("fused_cosloss::rows_backward", mutates_args=())
def rows_backward(
    backend: str, logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, saved: List[torch.Tensor],
    grad_ce: torch.Tensor, grad_cos: torch.Tensor, grad_lse: Optional[torch.Tensor], temperature: float, k: int,
    ignore_index: int, with_cos: bool, logit_scale: float, softcap: float, label_smoothing: float,
    need_logits_grad: bool, need_embedding_grad: bool,
) -> List[torch.Tensor]:
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    options = LossOptions.from_schema_args(temperature, k, ignore_index, with_cos, logit_scale, softcap,
                                           label_smoothing)
    dlogits, dembedding = _ops(backend).backward_rows(
        logits, labels, embedding, tuple(t.contiguous() for t in saved), grad_ce.contiguous(), grad_cos.contiguous(),
        options, need_logits_grad=need_logits_grad, need_embedding_grad=need_embedding_grad,
        grad_lse=None if grad_lse is None else grad_lse.contiguous())
    return [
        dlogits if dlogits is not None else logits.new_empty(0),
        dembedding if dembedding is not None else embedding.new_empty(0),
    ]


@rows_backward.register_fake
def _rows_backward_fake(backend, logits, labels, embedding, saved, grad_ce, grad_cos, grad_lse, temperature, k,
                        ignore_index, with_cos, logit_scale, softcap, label_smoothing, need_logits_grad,
                        need_embedding_grad):
    n, vocab = logits.shape
    dlogits = logits.new_empty(n, vocab) if need_logits_grad else logits.new_empty(0)
    # without the cosine term the loss does not depend on the embedding (every backend returns None)
    dembedding = embedding.new_empty(embedding.shape) if need_embedding_grad and with_cos else embedding.new_empty(0)
    return [dlogits, dembedding]


def _setup_context(ctx, inputs, output):
    backend, logits, labels, embedding, *schema_options = inputs
    ctx.save_for_backward(logits, labels, embedding, *output[4:])
    ctx.backend, ctx.options = backend, LossOptions.from_schema_args(*schema_options)


def _backward(ctx, grads):
    logits, labels, embedding, *saved = ctx.saved_tensors
    need_logits, need_embedding = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_ce, grad_cos, grad_lse = grads[0], grads[1], grads[3]
    if grad_ce is None:
        grad_ce = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    if grad_cos is None:
        grad_cos = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    dlogits, dembedding = torch.ops.fused_cosloss.rows_backward(
        ctx.backend, logits, labels, embedding, saved, grad_ce, grad_cos, grad_lse, *ctx.options.as_schema_args(),
        need_logits, need_embedding)
    return (
        None,
        dlogits if need_logits else None,
        None,
        dembedding if need_embedding and ctx.options.with_cos else None,
        None, None, None, None, None, None, None,
    )


rows_forward.register_autograd(_backward, setup_context=_setup_context)


def compiled_kernel_rows(backend: str, logits, labels, embedding, options: LossOptions):
    """``(ce, cos, correct, lse)`` of kernel backend ``backend`` through the custom op (the traced path)."""
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    out = torch.ops.fused_cosloss.rows_forward(
        f"{backend}/{SAVED_LAYOUTS[backend]}", logits, labels, embedding, *options.as_schema_args())
    return out[0], out[1], out[2], out[3]
