"""Edge cases every backend must get right: nothing to average, nothing at all, NaN, gradcheck."""
from __future__ import annotations

import pytest
import torch

from fused_cosloss import MixedLoss, mixed_loss
from helpers import assert_close_rel, make_inputs


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_positions_ignored_gives_zero_loss_and_zero_gradients(backend, reduction, gen):
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 29, 4, ignore_frac=1.0, device=device)
    logits.requires_grad_(), embedding.requires_grad_()
    out = mixed_loss(logits, labels, embedding, topk=5, reduction=reduction, backend=name, return_parts=True)
    for part in (out.loss, out.ce, out.cos):
        assert torch.all(part == 0), part
    assert int(out.n_valid) == 0 and int(out.n_correct) == 0 and float(out.cos_sim_sum) == 0
    out.loss.sum().backward()
    assert torch.all(logits.grad == 0) and torch.all(embedding.grad == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_positions_at_all(backend, reduction, gen):
    name, device = backend
    logits = torch.randn(2, 0, 17, device=device, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long, device=device)
    embedding = torch.randn(17, 3, device=device, requires_grad=True)
    loss = mixed_loss(logits, labels, embedding, topk=4, reduction=reduction, backend=name)
    if reduction == "none":
        assert loss.shape == (2, 0)
    else:
        assert loss.shape == () and float(loss) == 0.0
    loss.sum().backward()
    assert torch.all(embedding.grad == 0)


def test_nan_logits_poison_only_their_position(backend, gen):
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 5, 23, 4, ignore_frac=0.0, device=device)
    poisoned = logits.clone()
    poisoned[2, 7] = float("nan")
    clean = mixed_loss(logits, labels, embedding, topk=6, reduction="none", backend=name)
    dirty = mixed_loss(poisoned, labels, embedding, topk=6, reduction="none", backend=name)
    assert torch.isnan(dirty[2])
    keep = torch.arange(5, device=device) != 2
    assert_close_rel(dirty[keep], clean[keep], 1e-6, "other positions", floor=1)
    assert torch.isnan(mixed_loss(poisoned, labels, embedding, topk=6, backend=name))


def test_nan_logits_at_an_ignored_position_are_ignored(backend, gen):
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 4, 19, 3, ignore_frac=0.0, device=device)
    logits[1] = float("nan")
    labels[1] = -100
    loss = mixed_loss(logits.requires_grad_(), labels, embedding, topk=5, backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(logits.grad[1] == 0) and torch.isfinite(logits.grad).all()


def test_module_equals_functional(backend, gen):
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 31, 5, device=device)
    module = MixedLoss(alpha=0.3, temperature=0.7, topk=5, reduction="sum", backend=name)
    expected = mixed_loss(logits, labels, embedding, alpha=0.3, temperature=0.7, topk=5, reduction="sum", backend=name)
    assert torch.equal(module(logits, labels, embedding), expected)
    assert "alpha=0.3" in repr(module)


@pytest.mark.parametrize("topk", [1, 4, None])
def test_reference_gradcheck_float64(topk, gen):
    logits, labels, embedding = make_inputs(gen, 4, 11, 3, dtype=torch.float64, ignore_frac=0.25)
    logits.requires_grad_(), embedding.requires_grad_()

    def loss(z, e):
        out = mixed_loss(z, labels, e, alpha=0.4, temperature=0.8, topk=topk, backend="reference", return_parts=True)
        return out.loss, out.ce, out.cos

    assert torch.autograd.gradcheck(loss, (logits, embedding))
