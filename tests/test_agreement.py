"""Every backend against its oracle, on fresh random inputs.

The reference is checked against the float64 autograd of the literal transcription of docs/spec.md
(tests/spec_oracle.py); every kernel backend is checked against the reference. Both the
values (loss, its parts, the evaluation counts) and the gradients of logits and
embedding are compared, under an objective that also weighs the parts, so that
gradients arriving through ``ce`` and ``cos`` are exercised as well as through ``loss``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import backend_or_skip
from fused_cosloss import mixed_loss
from helpers import assert_close_rel, gradient_tolerance, make_inputs, tolerance
from spec_oracle import spec_loss

SHAPES = {  # name: (N, V, H, K, extra make_inputs options)
    "plain": (7, 37, 5, 4, {}),
    "V-below-K": (5, 10, 3, 16, {}),
    "K1": (6, 23, 4, 1, {}),
    "K-equals-V": (4, 19, 6, 19, {}),
    "topk-None": (5, 29, 4, None, {}),
    "ties": (9, 61, 8, 13, {"ties": True}),
    "neg-inf": (6, 40, 4, 12, {"neg_inf_frac": 0.8}),
    "wide-logits": (5, 33, 4, 6, {"scale": 30.0}),
}
TEMPERATURES = [0.05, 0.7, 1.0, 1.5, 10.0]
ALPHAS = [0.0, 0.25, 0.5, 1.0]
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cases() -> list:
    """Every shape at every temperature; alpha and reduction rotate through their values."""
    cases = []
    for i, (shape, temperature) in enumerate(itertools.product(SHAPES, TEMPERATURES)):
        alpha, reduction = ALPHAS[i % len(ALPHAS)], REDUCTIONS[i % len(REDUCTIONS)]
        cases.append(pytest.param(shape, temperature, alpha, reduction, id=f"{shape}-T{temperature}-a{alpha}-{reduction}"))
    return cases


def objective_weights(gen, reduction, n):
    """Random weights for loss, ce and cos: scalars, or [N] vectors for reduction='none'."""
    size = (3,) if reduction != "none" else (3, n)
    return (torch.rand(size, generator=gen, dtype=torch.float64) + 0.5).unbind(0)


def evaluate(fn, logits, labels, embedding, weights):
    """Values and gradients of sum_w (w * part) for loss, ce, cos from ``fn``."""
    logits = logits.detach().clone().requires_grad_()
    embedding = embedding.detach().clone().requires_grad_()
    out = fn(logits, labels, embedding)
    loss, ce, cos = out[0], out[1], out[2]
    objective = sum((w.to(p.dtype) * p).sum() for w, p in zip(weights, (loss, ce, cos)))
    if objective.requires_grad:
        objective.backward()
    else:  # the oracle with every position ignored: a constant 0
        logits.grad, embedding.grad = torch.zeros_like(logits), torch.zeros_like(embedding)
    return {"loss": loss, "ce": ce, "cos": cos, "n_valid": out[3], "n_correct": out[4],
            "cos_sim_sum": out[5], "dlogits": logits.grad, "dembedding": embedding.grad}


def compare(actual, expected, rel, reduction, grad_rel=None):
    for key in ("n_valid", "n_correct"):
        assert int(actual[key]) == int(expected[key]), key
    # a position contributes O(1) to either gradient (O(1/N_valid) under the mean), however small
    # its contribution happens to be (softmax - onehot near 0, or cos near 1)
    n_valid = max(1, int(expected["n_valid"]))
    for key in ("dlogits", "dembedding"):
        assert_close_rel(actual[key], expected[key], grad_rel or rel, key,
                         floor=1 / n_valid if reduction == "mean" else 1)
    # ce_n and the cosine distance are O(1) per position however close to 0 one happens to be,
    # and their rounding error is absolute (ce: |z| times the float epsilon)
    floor = max(1, int(expected["n_valid"])) if reduction == "sum" else 1
    for key in ("loss", "ce", "cos"):
        assert_close_rel(actual[key], expected[key], rel, key, floor=floor)
    # a sum of cosines in [-1, 1] can cancel: its error is measured against the number of terms
    error = abs(float(actual["cos_sim_sum"]) - float(expected["cos_sim_sum"]))
    assert error <= rel * max(1, int(expected["n_valid"])), f"cos_sim_sum: error {error:.3e}"


def package_fn(backend, **options):
    def fn(logits, labels, embedding):
        return mixed_loss(logits, labels, embedding, backend=backend, return_parts=True, **options)
    return fn


def oracle_fn(**options):
    options.pop("shift", None)

    def fn(logits, labels, embedding):
        return spec_loss(logits.double(), labels, embedding.double(), **options)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, temperature, alpha, reduction", _cases())
def test_backend_matches_oracle(backend, dtype, shape, temperature, alpha, reduction, gen):
    name, device = backend
    backend_or_skip(name, device, dtype)
    n, vocab, hidden, topk, extra = SHAPES[shape]
    logits, labels, embedding = make_inputs(gen, n, vocab, hidden, dtype=dtype, device=device, **extra)
    options = dict(alpha=alpha, temperature=temperature, topk=topk, reduction=reduction)
    weights = objective_weights(gen, reduction, n)

    actual = evaluate(package_fn(name, **options), logits, labels, embedding, weights)
    if name == "reference":
        expected = evaluate(oracle_fn(**options), logits, labels, embedding, weights)
    else:
        expected = evaluate(package_fn("reference", **options), logits, labels, embedding, weights)
    compare(actual, expected, tolerance(dtype), reduction, gradient_tolerance(dtype, temperature))


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_dtypes_and_custom_ignore_index(backend, dtype, emb_dtype, gen):
    name, device = backend
    backend_or_skip(name, device, dtype, emb_dtype)
    logits, labels, embedding = make_inputs(gen, 8, 45, 6, dtype=dtype, emb_dtype=emb_dtype, ignore_index=3,
                                            ignore_frac=0.4, device=device)
    labels = torch.where(labels == 3, torch.full_like(labels, 4), labels)  # 3 only where ignored
    options = dict(alpha=0.5, temperature=0.7, topk=9, reduction="mean", ignore_index=3)
    weights = objective_weights(gen, "mean", 8)
    actual = evaluate(package_fn(name, **options), logits, labels, embedding, weights)
    expected = evaluate(oracle_fn(**options), logits, labels, embedding, weights)
    compare(actual, expected, tolerance(torch.bfloat16 if torch.bfloat16 in (dtype, emb_dtype) else dtype), "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shift_matches_sliced_inputs(backend, reduction, gen):
    name, device = backend
    batch, time, vocab, hidden = 3, 5, 31, 4
    logits, labels, embedding = make_inputs(gen, batch * time, vocab, hidden, device=device)
    logits, labels = logits.view(batch, time, vocab), labels.view(batch, time)
    options = dict(alpha=0.5, temperature=1.5, topk=7, reduction=reduction)
    weights = objective_weights(gen, reduction, batch * (time - 1))
    if reduction == "none":
        weights = tuple(w.view(batch, time - 1) for w in weights)
    shifted = evaluate(package_fn(name, shift=True, **options), logits, labels, embedding, weights)

    sliced_logits = logits[:, :-1].reshape(-1, vocab)
    sliced_labels = labels[:, 1:].reshape(-1)
    flat_weights = tuple(w.reshape(-1) for w in weights) if reduction == "none" else weights
    expected = evaluate(oracle_fn(**options), sliced_logits, sliced_labels, embedding, flat_weights)
    if reduction == "none":
        assert shifted["loss"].shape == (batch, time - 1)
        for key in ("loss", "ce", "cos"):
            shifted[key] = shifted[key].reshape(-1)
    assert torch.all(shifted["dlogits"][:, -1] == 0), "the last position has no target after the shift"
    shifted["dlogits"] = shifted["dlogits"][:, :-1].reshape(-1, vocab)
    compare(shifted, expected, tolerance(torch.float32), reduction)
