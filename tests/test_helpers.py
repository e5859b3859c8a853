"""The test helpers themselves: ``run_and_backprop`` differentiates what it says, and
``assert_agrees`` fails on each kind of disagreement (so no agreement test can pass by accident)."""
from __future__ import annotations

import pytest
import torch

from fused_cosloss import mixed_loss
from helpers import (RELATIVE_FLOOR, UNIT_FLOORS, Backprop, assert_agrees, make_inputs, objective_weights,
                     run_and_backprop)

REL = 1e-5


def result(gen, *, n_valid=6, n=8, reduction="mean"):
    """A made-up ``run_and_backprop`` result: values of size ~1, gradients of size ~1 / n_valid
    (under the mean) with their largest entry exactly 0.5 / n_valid, and n_valid counted."""
    def gradient(*shape):
        g = torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.4 / n_valid
        g.view(-1)[0] = 0.5 / n_valid
        return g.float()

    values = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    if reduction == "none":
        values = torch.rand(3, n, generator=gen, dtype=torch.float64) + 0.5
    return Backprop(loss=values[0].float(), ce=values[1].float(), cos=values[2].float(),
                    n_valid=torch.tensor(n_valid), n_correct=torch.tensor(2), cos_sim_sum=torch.tensor(0.01),
                    dlogits=gradient(n, 11), dembedding=gradient(11, 3))


def perturbed(base, key, delta):
    """A copy of ``base`` with ``delta`` added to one entry of ``key``."""
    copy = Backprop({k: v.clone() if torch.is_tensor(v) else v for k, v in base.items()})
    copy[key].view(-1)[0] += delta
    return copy


def test_a_result_agrees_with_itself_and_within_the_tolerance(gen):
    base = result(gen)
    assert_agrees(base, base, rel=REL)
    assert_agrees(perturbed(base, "loss", 0.5 * REL), base, rel=REL)
    assert_agrees(perturbed(base, "dlogits", 0.4 * REL / 6), base, rel=REL)


@pytest.mark.parametrize("key, delta", [("n_valid", 1), ("n_correct", 1), ("n_correct", -1)])
def test_counts_must_be_equal(gen, key, delta):
    base = result(gen)
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, delta), base, rel=1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("key", ["loss", "ce", "cos"])
def test_values_are_compared_against_their_floor(gen, key, reduction):
    """Floor 1 (N_valid for 'sum'): an error of 3 rel times it fails, of a third of rel times it passes."""
    base = result(gen, reduction=reduction)
    floor = 6 if reduction == "sum" else 1  # every value is below it ('none': below 1.5, but the floor is 1)
    scale = max(floor, float(base[key].abs().max()))
    assert_agrees(perturbed(base, key, REL * scale / 3), base, rel=REL, reduction=reduction)
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, 3 * REL * scale), base, rel=REL, reduction=reduction)


@pytest.mark.parametrize("key", ["loss", "ce", "cos", "cos_sim_sum"])
def test_a_nan_value_fails(gen, key):
    base = result(gen)
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, float("nan")), base, rel=1.0)


def test_cos_sim_sum_error_is_held_to_rel_times_n_valid(gen):
    """A sum of 6 cosines equal to 0.01: the error may be 6 rel by default, only rel with UNIT_FLOORS."""
    base = result(gen)
    assert_agrees(perturbed(base, "cos_sim_sum", 5 * REL), base, rel=REL)
    with pytest.raises(AssertionError, match="cos_sim_sum"):
        assert_agrees(perturbed(base, "cos_sim_sum", 7 * REL), base, rel=REL)
    with pytest.raises(AssertionError, match="cos_sim_sum"):
        assert_agrees(perturbed(base, "cos_sim_sum", 5 * REL), base, rel=REL, floors=UNIT_FLOORS)
    large = Backprop(base, cos_sim_sum=torch.tensor(50.0))  # above N_valid (rounding aside): N_valid still bounds
    with pytest.raises(AssertionError, match="cos_sim_sum"):
        assert_agrees(perturbed(large, "cos_sim_sum", 10 * REL), large, rel=REL)


@pytest.mark.parametrize("key", ["dlogits", "dembedding"])
def test_gradients_are_compared_against_their_floor(gen, key):
    """Under the mean the floor is 1 / N_valid (the largest entry here is half of it); RELATIVE_FLOOR
    compares against the largest entry alone; grad_rel replaces rel."""
    base = result(gen)
    n_valid = 6
    assert_agrees(perturbed(base, key, 0.9 * REL / n_valid), base, rel=REL)
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, 1.1 * REL / n_valid), base, rel=REL)
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, 0.9 * REL / n_valid), base, rel=REL, floors={"grad": RELATIVE_FLOOR})
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, 0.9 * REL / n_valid), base, rel=REL, grad_rel=REL / 2)
    assert_agrees(perturbed(base, key, 1.1 * REL / n_valid), base, rel=REL, grad_rel=2 * REL)
    assert_agrees(perturbed(base, key, 0.9 * REL), base, rel=REL, reduction="sum")  # the sum's floor is 1
    with pytest.raises(AssertionError, match=key):
        assert_agrees(perturbed(base, key, 1.1 * REL), base, rel=REL, reduction="sum")


def test_missing_gradients_and_other_dtypes_fail(gen):
    base = result(gen)
    for change, message in [(dict(dembedding=None), "dembedding: no gradient"),
                            (dict(dlogits=base["dlogits"].double()), "dlogits: torch.float64 != torch.float32"),
                            (dict(dbias=base["dembedding"]), "not the same inputs")]:
        with pytest.raises(AssertionError, match=message):
            assert_agrees(Backprop(base, **change), base, rel=1.0)
        with pytest.raises(AssertionError):
            assert_agrees(base, Backprop(base, **change), rel=1.0)
    without = Backprop({k: v for k, v in base.items() if k != "dlogits"})
    with pytest.raises(AssertionError, match="not the same inputs"):
        assert_agrees(without, base, rel=1.0)


def test_unknown_floor_keys_are_refused(gen):
    base = result(gen)
    with pytest.raises(AssertionError, match="dlogits"):
        assert_agrees(base, base, rel=REL, floors={"dlogits": 1.0})


def test_run_and_backprop_differentiates_the_weighted_parts(gen):
    """Its gradients are those of the objective written out by hand; labels pass through; an input
    the objective does not reach has no gradient."""
    logits, labels, embedding = make_inputs(gen, 7, 20, 4)
    unused = torch.randn(3, generator=gen)
    weights = objective_weights(gen, "none", 7)
    options = dict(alpha=0.4, topk=5, reduction="none", backend="reference", return_parts=True)

    def fn(logits, labels, embedding, unused):
        return mixed_loss(logits, labels, embedding, **options)

    got = run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding, unused=unused),
                           weights=weights)
    z, e = logits.clone().requires_grad_(), embedding.clone().requires_grad_()
    out = mixed_loss(z, labels, e, **options)
    (weights[0].float() * out.loss + weights[1].float() * out.ce + weights[2].float() * out.cos).sum().backward()
    assert torch.equal(got.dlogits, z.grad) and torch.equal(got["dembedding"], e.grad)
    assert got.dunused is None and "dlabels" not in got
    for key in ("loss", "ce", "cos", "n_valid", "n_correct", "cos_sim_sum"):
        assert torch.equal(got[key], getattr(out, key)), key
    assert logits.grad is None and not logits.requires_grad, "the caller's tensors are left alone"


def test_run_and_backprop_weights_only_the_chosen_parts(gen):
    logits, labels, embedding = make_inputs(gen, 6, 15, 3)
    inputs = dict(logits=logits, embedding=embedding)

    def fn(logits, embedding):
        return mixed_loss(logits, labels, embedding, topk=4, backend="reference", return_parts=True)

    got = run_and_backprop(fn, inputs, weights=(2.5,), parts=("ce",))
    z = logits.clone().requires_grad_()
    (2.5 * mixed_loss(z, labels, embedding, topk=4, backend="reference", return_parts=True).ce).backward()
    assert torch.equal(got.dlogits, z.grad) and got.dembedding is None
    loss_only = run_and_backprop(lambda logits, embedding: fn(logits, embedding).loss, inputs, parts=("loss",))
    assert set(loss_only) == {"loss", "dlogits", "dembedding"}
    with pytest.raises(AssertionError, match="weights"):
        run_and_backprop(fn, inputs, weights=(1.0, 2.0))


def test_a_constant_objective_has_zero_gradients():
    """The float64 oracle with every position ignored returns constants: their derivative is 0."""
    tensors = dict(logits=torch.randn(3, 5), embedding=torch.randn(5, 2))
    got = run_and_backprop(lambda logits, embedding: (torch.zeros(()), torch.zeros(()), torch.zeros(())), tensors)
    assert torch.equal(got.dlogits, torch.zeros(3, 5)) and torch.equal(got.dembedding, torch.zeros(5, 2))


def test_the_pair_catches_a_different_objective(gen):
    """End to end: the same backend under other weights of the parts disagrees in its gradients."""
    logits, labels, embedding = make_inputs(gen, 8, 25, 4)
    tensors = dict(logits=logits, labels=labels, embedding=embedding)

    def fn(logits, labels, embedding):
        return mixed_loss(logits, labels, embedding, alpha=0.5, topk=5, backend="reference", return_parts=True)

    weights = objective_weights(gen, "mean", 8)
    first = run_and_backprop(fn, tensors, weights=weights)
    assert_agrees(run_and_backprop(fn, tensors, weights=weights), first, rel=REL)
    other = run_and_backprop(fn, tensors, weights=(weights[0], weights[1] + 0.25, weights[2]))
    with pytest.raises(AssertionError, match="dlogits"):
        assert_agrees(other, first, rel=REL)
