"""Precision against float64, by Cut Cross-Entropy's criterion: on the same inputs, every
backend's error in the loss and in the logits and embedding gradients is no worse than a
small factor of the error of the naive same-dtype PyTorch formulation (``naive_mixed_loss``)
plus a floor of a few ulps. A fixed tolerance would hide an error that grows as 1/T; this
criterion holds each backend to what the dtype allows on these very inputs.

The matrix is the one where a cancellation shows: low temperatures, alpha = 1 (the cosine
term alone), peaked logits (one dominant entry of S, w near 1), and the sizes of S that take
different code paths (K = 1, a K < V, the whole row, and a row longer than the Triton
backend's sparse limit, which takes its dense path).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss import mixed_loss
from helpers import run_and_backprop

FACTOR = 4.0
FLOOR_ULPS = 8.0
TEMPERATURES = [0.01, 0.05, 0.2, 1.0, 10.0]
ALPHAS = [0.5, 1.0]
LOGITS = {"peaked": 6.0, "flat": 0.2}
TOPKS = {"K1": 1, "K17": 17, "None": None, "K>=V": 64}
VOCAB, HIDDEN, ROWS = 50, 16, 16
DENSE_VOCAB = 1100  # above the Triton backend's sparse limit (1024): topk=None takes its dense path
BACKENDS = ["reference", "native", "triton"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def naive_mixed_loss(logits, labels, embedding, *, alpha, temperature, topk, ignore_index=-100):
    """The loss as a user would write it, in the inputs' dtype throughout (no upcast): a full
    softmax at temperature T, top-k of the probabilities, a gathered [N, K, H] einsum, cosine;
    autograd for the gradients."""
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / n_valid
    k = logits.shape[-1] if topk is None else min(topk, logits.shape[-1])
    top_p, top_i = torch.softmax(logits / temperature, dim=-1).topk(k, dim=-1)
    mu = torch.einsum("nk,nkh->nh", top_p, embedding[top_i])
    e = embedding[torch.where(valid, labels, 0)]
    cos = (mu * e).sum(-1) / (mu.norm(dim=-1).clamp_min(1e-12) * e.norm(dim=-1).clamp_min(1e-12))
    dist = torch.where(valid, 1 - cos, torch.zeros_like(cos)).sum() / n_valid
    return alpha * dist + (1 - alpha) * ce


def _inputs(gen, vocab, scale, dtype):
    """Logits of the given scale (peaked: a few entries far above the rest), labels with a
    quarter ignored, and an embedding, all exactly representable in ``dtype``."""
    logits = (torch.randn(ROWS, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (ROWS,), generator=gen)
    labels[torch.rand(ROWS, generator=gen) < 0.25] = -100
    embedding = torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    return logits, labels, embedding


def _value_and_grads(fn, logits, labels, embedding):
    """The loss ``fn(logits, labels, embedding)`` and its gradients, in float64."""
    result = run_and_backprop(lambda logits, labels, embedding: fn(logits, labels, embedding),
                              dict(logits=logits, labels=labels, embedding=embedding), parts=("loss",))
    return result.loss.detach().double(), result.dlogits.double(), result.dembedding.double()


def _error(actual, truth):
    return (actual - truth).abs().max().item()


def _natural_scales(labels, alpha, temperature):
    """The size of the terms each compared quantity is summed from: O(1) for the loss; a
    position's coefficient 1 / N_valid, times the cosine gradient's 1 / T, for the gradients.
    Peaked rows at a low T saturate the softmax, and the true gradient can then be far below
    these terms (1e-20 of them): there float32 holds no digit of it in any formulation, and
    an error under eps^2 of the terms' size is not held against a backend."""
    per_row = 1.0 / max(int((labels != -100).sum()), 1)
    return 1.0, per_row * max(1.0, alpha / temperature), per_row * max(1.0, alpha)


def _bound(naive_error, truth, scale, dtype):
    """FACTOR x the naive formulation's error, plus FLOOR_ULPS ulps of the true value's size,
    plus eps^2 of its terms' size (``_natural_scales``)."""
    eps = torch.finfo(dtype).eps
    return FACTOR * naive_error + FLOOR_ULPS * eps * truth.abs().max().item() + eps * eps * scale


def _cases():
    cases = [pytest.param(temperature, alpha, logits, TOPKS[topk], VOCAB, id=f"T{temperature}-a{alpha}-{logits}-{topk}")
             for temperature, alpha, logits, topk in itertools.product(TEMPERATURES, ALPHAS, LOGITS, TOPKS)]
    cases += [pytest.param(temperature, 1.0, "peaked", None, DENSE_VOCAB, id=f"T{temperature}-a1.0-peaked-dense")
              for temperature in (0.05, 1.0)]
    return cases


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, alpha, logits_kind, topk, vocab", _cases())
def test_error_no_worse_than_naive_same_dtype(gen, backend, dtype, temperature, alpha, logits_kind, topk, vocab):
    backend_or_skip(backend, "cpu", dtype)
    logits, labels, embedding = _inputs(gen, vocab, LOGITS[logits_kind], dtype)
    _assert_no_worse_than_naive(backend, naive_mixed_loss, logits, labels, embedding,
                                dict(alpha=alpha, temperature=temperature, topk=topk), what=backend)


def _assert_no_worse_than_naive(backend, naive, logits, labels, embedding, options, *, what):
    """The criterion on these inputs: ``backend``'s error against the float64 reference, in the loss and
    both gradients, within ``_bound`` of the error of ``naive`` (the same-dtype formulation)."""
    dtype = logits.dtype
    truth = _value_and_grads(lambda z, y, e: mixed_loss(z, y, e, backend="reference", **options),
                             logits.double(), labels, embedding.double())
    naive_results = _value_and_grads(lambda z, y, e: naive(z, y, e, **options), logits, labels, embedding)
    ours = _value_and_grads(lambda z, y, e: mixed_loss(z, y, e, backend=backend, **options), logits, labels, embedding)
    scales = _natural_scales(labels, options["alpha"], options["temperature"])
    for part, mine, theirs, exact, scale in zip(("loss", "d/dlogits", "d/dembedding"), ours, naive_results, truth,
                                                scales):
        bound = _bound(_error(theirs, exact), exact, scale, dtype)
        err = _error(mine, exact)
        assert err <= bound, (f"{what} {part}: error {err:.3e} against float64 is above {bound:.3e} "
                              f"({FACTOR}x the naive {dtype} formulation's {_error(theirs, exact):.3e} + "
                              f"{FLOOR_ULPS} ulps)")


# ---- the loss options (docs/spec.md, "Loss options") --------------------------------------------

OPTION_SETS = {
    "cap": dict(softcap=5.0),
    "all": dict(logit_scale=2.0, softcap=5.0, label_smoothing=0.1, z_loss=1e-3),
}


def naive_loss_with_options(logits, labels, embedding, *, alpha, temperature, topk, logit_scale=None, softcap=None,
                            label_smoothing=0.0, z_loss=0.0, ignore_index=-100):
    """``naive_mixed_loss`` on the transformed logits, all in the inputs' dtype: the scale and the cap
    as a model applies them, F.cross_entropy's label smoothing, the z-loss from a same-dtype logsumexp."""
    z = logits * logit_scale if logit_scale is not None else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)
    loss = naive_mixed_loss(z, labels, embedding, alpha=alpha, temperature=temperature, topk=topk,
                            ignore_index=ignore_index)
    if label_smoothing:
        smoothed = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum",
                                   label_smoothing=label_smoothing)
        plain = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
        loss = loss + (1 - alpha) * (smoothed - plain) / n_valid
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        loss = loss + z_loss * torch.where(valid, lse * lse, torch.zeros_like(lse)).sum() / n_valid
    return loss


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("temperature, alpha, logits_kind, topk", [
    pytest.param(t, a, kind, TOPKS[k], id=f"T{t}-a{a}-{kind}-{k}")
    for t, a, kind, k in [(0.05, 1.0, "peaked", "K17"), (1.0, 0.5, "peaked", "None"), (0.2, 0.5, "flat", "K1"),
                          (1.0, 1.0, "flat", "K>=V")]])
def test_options_error_no_worse_than_naive_same_dtype(gen, backend, dtype, option_set, temperature, alpha,
                                                      logits_kind, topk):
    backend_or_skip(backend, "cpu", dtype)
    logits, labels, embedding = _inputs(gen, VOCAB, LOGITS[logits_kind], dtype)
    _assert_no_worse_than_naive(backend, naive_loss_with_options, logits, labels, embedding,
                                dict(alpha=alpha, temperature=temperature, topk=topk, **OPTION_SETS[option_set]),
                                what=f"{backend} {option_set}")
