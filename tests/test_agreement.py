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
from helpers import assert_agrees, gradient_tolerance, make_inputs, objective_weights, run_and_backprop, tolerance
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


def evaluate(fn, logits, labels, embedding, weights):
    """Values and gradients of sum_w (w * part) for loss, ce, cos from ``fn(logits, labels, embedding)``."""
    return run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding), weights=weights)


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
    assert_agrees(actual, expected, rel=tolerance(dtype), grad_rel=gradient_tolerance(dtype, temperature),
                  reduction=reduction)


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
    assert_agrees(actual, expected, rel=tolerance(torch.bfloat16 if torch.bfloat16 in (dtype, emb_dtype) else dtype),
                  reduction="mean")


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
        for key in ("loss", "ce", "cos", "z_loss"):
            shifted[key] = shifted[key].reshape(-1)
    assert torch.all(shifted["dlogits"][:, -1] == 0), "the last position has no target after the shift"
    shifted["dlogits"] = shifted["dlogits"][:, :-1].reshape(-1, vocab)
    assert_agrees(shifted, expected, rel=tolerance(torch.float32), reduction=reduction)
