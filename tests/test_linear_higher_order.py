"""The fused-linear mode under a second backward and under ``create_graph=True`` (issue 19):
the right gradients or the package's own error, never a plausible wrong value.

``reduction="none"`` recomputes each chunk in its backward: a second backward gives the same
gradient again, and a backward with ``create_graph=True`` builds a differentiable graph (a
gradient penalty on ``hidden`` matches float64 double-backward autograd of the spec's literal
transcription, tests/spec_oracle.py, on ``hidden @ weight.T + bias``). ``"mean"`` and ``"sum"``
compute the gradient in the forward: both raise ``UnsupportedDifferentiationError`` naming
``reduction='none'``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_cosloss import UnsupportedDifferentiationError, linear_mixed_loss
from helpers import assert_close_rel, gradient_tolerance, tolerance
from spec_oracle import spec_rows

IGNORE = -100
VOCAB, HIDDEN, EMB_HIDDEN = 24, 8, 6
NAMES = ("hidden", "weight", "embedding", "bias")


def draw(gen, n, device, *, tied):
    """hidden [N, H], weight [V, H], labels (some ignored), embedding or None, bias [V]: float32."""
    hidden = torch.randn(n, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.6
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = IGNORE
    embedding = None if tied else torch.randn(VOCAB, EMB_HIDDEN, generator=gen)
    bias = torch.randn(VOCAB, generator=gen) * 0.3
    return [None if t is None else t.to(device) for t in (hidden, weight, labels, embedding, bias)]


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype, copy=True).requires_grad_() for t in tensors]


def penalised_gradients(loss_fn, hidden, weight, embedding, bias, penalty=10.0):
    """Gradients of ``loss + penalty * |d loss / d hidden|^2`` with respect to hidden, weight,
    embedding and bias (the first gradient taken with create_graph=True), on fresh leaves."""
    h, w, e, b = inputs = leaves([hidden, weight, embedding, bias])
    loss = loss_fn(h, w, e, b)
    (first,) = torch.autograd.grad(loss, h, create_graph=True)
    total = loss + penalty * (first.double() ** 2).sum()
    wanted = [t for t in inputs if t is not None]
    return first.detach(), torch.autograd.grad(total, wanted)


def spec_loss(labels, weights, *, alpha, temperature, topk, reduction):
    """loss(hidden, weight, embedding, bias) by the spec's transcription on F.linear's logits:
    the mean or sum, or for "none" the per-position losses weighted by ``weights``."""
    def loss(h, w, e, b):
        ce, dist, _, _, valid = spec_rows(F.linear(h, w, b), labels, w if e is None else e, temperature, topk, IGNORE)
        rows = alpha * dist + (1 - alpha) * ce
        if reduction == "none":
            return (rows * weights).sum()
        return rows.sum() / max(sum(valid), 1) if reduction == "mean" else rows.sum()
    return loss


def fused_loss(labels, weights, name, *, reduction, **options):
    def loss(h, w, e, b):
        out = linear_mixed_loss(h, w, labels, embedding=e, bias=b, backend=name, reduction=reduction, chunk_size=4,
                                **options)
        return (out * weights.to(out.dtype)).sum() if reduction == "none" else out
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha, topk, temperature, tied", [(0.0, 5, 1.0, True), (0.4, 5, 0.7, False),
                                                            (0.6, None, 1.0, True)],
                         ids=["ce-only", "top5-untied", "dense-tied"])
def test_gradient_penalty_on_hidden(backend, gen, reduction, alpha, topk, temperature, tied):
    """Exact against float64 double-backward of the spec, or the package's error (mean and sum)."""
    name, device = backend
    hidden, weight, labels, embedding, bias = draw(gen, 9, device, tied=tied)
    weights = torch.rand(9, generator=gen, dtype=torch.float64).to(device) + 0.5
    options = dict(alpha=alpha, topk=topk, temperature=temperature)
    fused = fused_loss(labels, weights, name, reduction=reduction, **options)
    if reduction != "none":
        with pytest.raises(UnsupportedDifferentiationError, match="create_graph") as error:
            penalised_gradients(fused, hidden, weight, embedding, bias)
        assert "reduction='none'" in str(error.value)
        return
    expected_first, expected = penalised_gradients(spec_loss(labels, weights, reduction=reduction, **options),
                                                   *[None if t is None else t.double()
                                                     for t in (hidden, weight, embedding, bias)])
    first, actual = penalised_gradients(fused, hidden, weight, embedding, bias)
    assert_close_rel(first, expected_first, tolerance(torch.float32), "d loss / d hidden")
    rel = gradient_tolerance(torch.float32, temperature)
    names = [what for what, t in zip(NAMES, (hidden, weight, embedding, bias)) if t is not None]
    for what, got, want in zip(names, actual, expected, strict=True):
        assert got.dtype == torch.float32, what
        assert_close_rel(got, want, rel, f"penalised d{what}")


def test_penalty_in_float64_is_exact_to_float64_precision(gen):
    """The differentiable backward (reference formulation, chunk by chunk) in float64: the spec's
    double-backward gradients to 1e-10, through the top-k path with an untied embedding."""
    hidden, weight, labels, embedding, bias = [None if t is None else t.double() if t.is_floating_point() else t
                                               for t in draw(gen, 10, "cpu", tied=False)]
    weights = torch.rand(10, generator=gen, dtype=torch.float64) + 0.5
    options = dict(alpha=0.4, topk=6, temperature=0.7, reduction="none")
    _, expected = penalised_gradients(spec_loss(labels, weights, **options), hidden, weight, embedding, bias)
    _, actual = penalised_gradients(fused_loss(labels, weights, "reference", **options), hidden, weight, embedding,
                                    bias)
    for what, got, want in zip(NAMES, actual, expected, strict=True):
        assert_close_rel(got, want, 1e-10, f"penalised d{what}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward(backend, gen, reduction):
    """"none": the second backward adds the same gradients again (bitwise: the chunks are recomputed
    alike). "mean" / "sum": the first backward's gradients are right, the second raises."""
    name, device = backend
    hidden, weight, labels, embedding, bias = draw(gen, 11, device, tied=False)
    weights = torch.rand(11, generator=gen, dtype=torch.float64).to(device) + 0.5
    options = dict(alpha=0.5, topk=5, temperature=0.8)
    h, w, e, b = inputs = leaves([hidden, weight, embedding, bias])
    loss = fused_loss(labels, weights, name, reduction=reduction, **options)(h, w, e, b)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in inputs]

    _, expected = penalised_gradients(spec_loss(labels, weights, reduction=reduction, **options),
                                      *[t.double() for t in (hidden, weight, embedding, bias)], penalty=0.0)
    for what, got, want in zip(NAMES, first, expected, strict=True):
        assert_close_rel(got, want, gradient_tolerance(torch.float32, 0.8), f"d{what}")
    if reduction != "none":
        with pytest.raises(UnsupportedDifferentiationError, match="second backward") as error:
            loss.backward()
        assert "reduction='none'" in str(error.value)
        return
    loss.backward()
    for what, t, once in zip(NAMES, inputs, first, strict=True):
        assert torch.equal(t.grad, 2 * once), f"d{what} after two backwards is not twice the first"
