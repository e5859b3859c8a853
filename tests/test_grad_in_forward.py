"""grad_in_forward: the reduced loss's gradient computed in the forward (KernelLossFunction) equals the
gradient the backward computes (KernelRowsFunction), and the reference's."""
from __future__ import annotations

import pytest
import torch

from conftest import backend_or_skip
from fused_cosloss import MixedLoss, mixed_loss
from helpers import assert_close_rel, gradient_tolerance, make_inputs, run_and_backprop, tolerance


def _loss_and_gradients(name, logits, labels, embedding, *, grad_in_forward, upstream=1.0, **options):
    """The loss, the gradients of upstream * loss (None where none arrives) and the loss's grad_fn."""
    def fn(logits, labels, embedding):
        return mixed_loss(logits, labels, embedding, backend=name, grad_in_forward=grad_in_forward, **options)
    result = run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding), weights=(upstream,),
                              parts=("loss",))
    return result.loss.detach(), result.dlogits, result.dembedding, result.loss.grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alpha, topk, options", [(0.0, 5, {}), (0.5, 5, {"ties": True}), (1.0, 1, {}),
                                                  (0.3, None, {}), (0.6, 6, {"neg_inf_frac": 0.8})],
                         ids=["ce-only", "k5-ties", "cos-only-k1", "whole-vocab", "neg-inf"])
def test_gradient_in_forward_equals_the_backward_one(backend, gen, dtype, reduction, alpha, topk, options):
    name, device = backend
    backend_or_skip(name, device, dtype)
    logits, labels, embedding = make_inputs(gen, 11, 37, 6, dtype=dtype, device=device, **options)
    opts = dict(alpha=alpha, topk=topk, temperature=0.8, reduction=reduction)
    loss, dz, de, grad_fn = _loss_and_gradients(name, logits, labels, embedding, grad_in_forward=True, **opts)
    loss_ref, dz_ref, de_ref, _ = _loss_and_gradients(name, logits, labels, embedding, grad_in_forward=False, **opts)
    if name != "reference":
        assert type(grad_fn).__name__ == "KernelLossFunctionBackward"
    rel = tolerance(torch.float32 if dtype == torch.float32 else torch.bfloat16)
    assert_close_rel(loss, loss_ref, rel, "loss", floor=1.0)
    # the same kernels on the same coefficients: the same gradient, to the last bit for the logits
    assert torch.equal(dz, dz_ref)
    if alpha > 0:
        assert_close_rel(de, de_ref, gradient_tolerance(dtype, 0.8), "dembedding")
    else:
        assert de is None and de_ref is None


def test_matches_the_reference_with_upstream_gradient_and_frozen_embedding(backend, gen):
    """An incoming gradient other than 1 scales the stored gradient; a frozen embedding gets none."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 10, 33, 5, device=device)
    opts = dict(alpha=0.5, topk=4, temperature=0.6)
    z = logits.clone().requires_grad_(True)
    (mixed_loss(z, labels, embedding, backend=name, grad_in_forward=True, **opts) * -2.5).backward()
    z_ref = logits.clone().requires_grad_(True)
    (mixed_loss(z_ref, labels, embedding, backend="reference", **opts) * -2.5).backward()
    assert_close_rel(z.grad, z_ref.grad, gradient_tolerance(torch.float32, 0.6), "dlogits")


def test_the_default_computes_in_the_forward_only_without_parts(backend, gen):
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 20, 4, device=device)
    z = logits.clone().requires_grad_(True)
    kernel = name != "reference"
    assert (type(mixed_loss(z, labels, embedding, backend=name).grad_fn).__name__ == "KernelLossFunctionBackward") == kernel
    parts = mixed_loss(z, labels, embedding, backend=name, return_parts=True)
    assert type(parts.loss.grad_fn).__name__ != "KernelLossFunctionBackward"
    rows = mixed_loss(z, labels, embedding, backend=name, reduction="none")
    assert type(rows.grad_fn).__name__ != "KernelLossFunctionBackward"
    with torch.no_grad():
        assert mixed_loss(z, labels, embedding, backend=name).grad_fn is None


def test_parts_are_for_logging_only(backend, gen):
    """With grad_in_forward=True and the parts returned: the loss trains, the parts refuse a gradient."""
    name, device = backend
    if name == "reference":
        pytest.skip("the reference differentiates its parts whatever grad_in_forward says")
    logits, labels, embedding = make_inputs(gen, 6, 20, 4, device=device)
    z = logits.clone().requires_grad_(True)
    out = mixed_loss(z, labels, embedding, backend=name, return_parts=True, grad_in_forward=True, topk=3)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="parts cannot be differentiated"):
        out.ce.backward()
    out = mixed_loss(z, labels, embedding, backend=name, grad_in_forward=True, topk=3)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        out.backward()


def test_inplace_overwrites_the_logits_in_the_call(backend, gen):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference writes in the backward")
    logits, labels, embedding = make_inputs(gen, 8, 25, 4, device=device)
    base = logits.clone().requires_grad_(True)
    z = base * 1
    loss = MixedLoss(topk=5, backend=name, inplace_grad=True)(z, labels, embedding)
    want = logits.clone().requires_grad_(True)
    MixedLoss(topk=5, backend=name)(want, labels, embedding).backward()
    assert torch.equal(z.detach(), want.grad), "the logits do not hold their gradient after the call"
    loss.backward()
    assert torch.equal(base.grad, want.grad)


def test_bad_options_are_refused(gen):
    logits, labels, embedding = make_inputs(gen, 4, 10, 3)
    with pytest.raises(ValueError, match="grad_in_forward: expected reduction 'mean' or 'sum'"):
        mixed_loss(logits.requires_grad_(), labels, embedding, reduction="none", grad_in_forward=True)
    with pytest.raises(TypeError, match="grad_in_forward: expected True, False or None"):
        mixed_loss(logits, labels, embedding, grad_in_forward="yes")


def test_triton_in_hidden_chunks_and_pieces(gen, monkeypatch):
    """The Triton row kernel's gradient pass with the backward's chunks and pieces, a row with
    NaN and rows whose cosine weight is 0 (alpha = 1 and ignored rows)."""
    backend_or_skip("triton", "cpu")
    from fused_cosloss.triton_ops.config import CONFIG

    monkeypatch.setattr(CONFIG, "hidden_chunk", 16)
    monkeypatch.setattr(CONFIG, "piece_entries", 2 * 6)
    logits, labels, embedding = make_inputs(gen, 9, 40, 36)
    logits[4, 7] = float("nan")
    for alpha in (0.5, 1.0):
        opts = dict(alpha=alpha, topk=6, temperature=0.9)
        loss, dz, de, _ = _loss_and_gradients("triton", logits, labels, embedding, grad_in_forward=True, **opts)
        loss_ref, dz_ref, de_ref, _ = _loss_and_gradients("triton", logits, labels, embedding, grad_in_forward=False,
                                                          **opts)
        assert torch.equal(dz.nan_to_num(), dz_ref.nan_to_num())
        assert torch.equal(de.nan_to_num(), de_ref.nan_to_num())
        assert torch.isnan(dz[4]).all() == (labels[4] != -100)
