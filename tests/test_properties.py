"""Properties of the loss, on inputs drawn by hypothesis (reference backend, and every backend for the cheap ones)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_cosloss import mixed_loss
from helpers import assert_close_rel, make_inputs

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70), st.integers(1, 9))  # N, V, H
options = st.fixed_dictionaries({
    "alpha": st.floats(0.0, 1.0),
    "temperature": st.floats(0.05, 10.0),
    "topk": st.one_of(st.none(), st.integers(1, 80)),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
})
seeds = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=40, deadline=None)


def loss_floor(reduction, n):
    """The natural size of a reduced loss: per-position losses are O(1), so a sum of n is O(n)."""
    return n if reduction == "sum" else 1


def inputs(seed, shape, **kwargs):
    return make_inputs(torch.Generator().manual_seed(seed), *shape, **kwargs)


@SETTINGS
@given(shape=shapes, opts=options, seed=seeds)
def test_loss_is_the_alpha_mix_of_its_parts(shape, opts, seed):
    logits, labels, embedding = inputs(seed, shape)
    out = mixed_loss(logits, labels, embedding, backend="reference", return_parts=True, **opts)
    alpha = opts["alpha"]
    assert_close_rel(out.loss, alpha * out.cos + (1 - alpha) * out.ce, 1e-6, "loss",
                     floor=loss_floor(opts["reduction"], shape[0]))


@SETTINGS
@given(shape=shapes, reduction=st.sampled_from(["mean", "sum", "none"]), seed=seeds,
       ignore_index=st.sampled_from([-100, -1, 0]))
def test_alpha_zero_is_cross_entropy(shape, reduction, seed, ignore_index):
    logits, labels, embedding = inputs(seed, shape, ignore_index=ignore_index)
    logits.requires_grad_()
    ours = mixed_loss(logits, labels, embedding, alpha=0.0, ignore_index=ignore_index, reduction=reduction,
                      backend="reference")
    theirs = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    if reduction == "mean" and bool((labels == ignore_index).all()):
        # F.cross_entropy gives NaN here; by design we give 0 with zero gradients
        theirs, g_theirs = torch.zeros_like(theirs), torch.zeros_like(g_theirs)
    assert_close_rel(ours, theirs, 1e-5, "loss", floor=loss_floor(reduction, shape[0]))
    # a row of the CE gradient is softmax - onehot, O(1) (O(1/N) under the mean) however small it is
    assert_close_rel(g_ours, g_theirs, 1e-5, "dlogits", floor=1 / shape[0] if reduction == "mean" else 1)


@SETTINGS
@given(shape=shapes, opts=options, seed=seeds, scale=st.floats(1e-3, 1e3))
def test_scaling_the_embedding_leaves_the_cosine_unchanged(shape, opts, seed, scale):
    logits, labels, embedding = inputs(seed, shape)
    base = mixed_loss(logits, labels, embedding, backend="reference", return_parts=True, **opts)
    scaled = mixed_loss(logits, labels, embedding * scale, backend="reference", return_parts=True, **opts)
    # cosines are bounded by 1, so an absolute tolerance is the meaningful one
    assert torch.allclose(scaled.cos, base.cos, rtol=0, atol=1e-5)
    assert torch.allclose(scaled.cos_sim_sum, base.cos_sim_sum, rtol=0, atol=1e-5 * logits.shape[0])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, seed=seeds)
def test_every_backend_agrees_on_the_mix(backend, shape, seed):
    name, device = backend
    logits, labels, embedding = inputs(seed, shape, device=device)
    out = mixed_loss(logits, labels, embedding, alpha=0.5, topk=8, backend=name, return_parts=True)
    ref = mixed_loss(logits, labels, embedding, alpha=0.5, topk=8, backend="reference", return_parts=True)
    assert_close_rel(out.loss, ref.loss, 1e-5, "loss", floor=1)
    assert int(out.n_correct) == int(ref.n_correct)
