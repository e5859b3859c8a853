"""inplace_grad=True: the logits' storage receives their gradient, equal to the ordinary one."""
from __future__ import annotations

import pytest
import torch

from conftest import backend_or_skip
from fused_cosloss import MixedLoss, mixed_loss
from helpers import make_inputs


def _gradients(name, logits, labels, embedding, inplace, **options):
    """(the logits' storage after backward, d logits as autograd delivers it, d embedding)."""
    base = logits.detach().clone().requires_grad_()
    table = embedding.detach().clone().requires_grad_()
    z = base * 1  # a non-leaf, as the logits of a model are
    mixed_loss(z, labels, table, backend=name, inplace_grad=inplace, **options).backward()
    return z.detach(), base.grad, table.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("topk, options", [(7, {}), (1, {"ties": True}), (None, {}), (6, {"neg_inf_frac": 0.8})],
                         ids=["k7", "k1-ties", "whole-vocab", "neg-inf"])
def test_inplace_gradient_equals_the_ordinary_one(backend, gen, dtype, topk, options):
    name, device = backend
    backend_or_skip(name, device, dtype)
    logits, labels, embedding = make_inputs(gen, 9, 40, 5, dtype=dtype, device=device, **options)
    storage, dlogits, dembedding = _gradients(name, logits, labels, embedding, True, topk=topk, alpha=0.4)
    _, dlogits_ref, dembedding_ref = _gradients(name, logits, labels, embedding, False, topk=topk, alpha=0.4)
    assert torch.equal(dlogits, dlogits_ref)
    assert torch.equal(storage, dlogits_ref), "the logits' storage does not hold their gradient"
    assert torch.equal(dembedding, dembedding_ref)


def test_inplace_with_shift_and_module(backend, gen):
    """[B, T, V] logits with the causal shift: the last position's gradient (zero) is written too."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 12, 30, 4, device=device, ignore_frac=0.0)
    logits, labels = logits.reshape(3, 4, 30), labels.reshape(3, 4)
    z = logits.clone().requires_grad_()
    MixedLoss(topk=5, shift=True, backend=name, inplace_grad=True)(z * 1, labels, embedding).backward()
    expected = logits.clone().requires_grad_()
    MixedLoss(topk=5, shift=True, backend=name)(expected, labels, embedding).backward()
    torch.testing.assert_close(z.grad, expected.grad, rtol=0, atol=0)
    assert torch.count_nonzero(z.grad[:, -1]) == 0


def test_a_saved_use_of_the_logits_fails_loudly(backend, gen):
    """Another op that saved the logits for its backward must raise, not use their gradient."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 20, 3, device=device)
    base = logits.clone().requires_grad_()
    z = base * 1
    other = z.sin().sum()  # sin saves its input
    loss = mixed_loss(z, labels, embedding, topk=4, backend=name, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_refused_under_compile():
    backend_or_skip("reference", "cpu")

    def step(z, y, e):
        return mixed_loss(z, y, e, topk=3, backend="reference", inplace_grad=True)

    z = torch.randn(4, 10, requires_grad=True)
    with pytest.raises(Exception, match="inplace_grad"):
        torch.compile(step, backend="eager", fullgraph=True)(z, torch.randint(0, 10, (4,)), torch.randn(10, 3))
