"""The fused-linear mode against ``mixed_loss`` on explicit logits, on every backend.

``linear_mixed_loss(hidden, weight, labels, embedding=..., bias=...)`` must equal
``mixed_loss(hidden @ weight.T + bias, labels, embedding or weight)`` in value and in the
gradients of hidden, weight, bias and embedding (both uses of weight when tied), for every
reduction and for chunk sizes that do and do not divide N; and its peak memory must not
grow with N beyond the O(N * (K + H)) it saves per position.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss import LinearMixedLoss, linear_mixed_loss, mixed_loss
from helpers import RELATIVE_FLOOR, assert_agrees, assert_close_rel, objective_weights, run_and_backprop, tolerance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.measure import cpu_peak_supported, peak_bytes  # noqa: E402

# (N, chunk_size, tied, with bias, reduction): chunks that divide N, that do not, one chunk
# larger than N, and the default; each reduction tied and untied, with and without bias
CASES = [
    (24, 8, True, False, "mean"),
    (23, 5, False, True, "mean"),
    (23, 7, True, True, "sum"),
    (24, 64, False, False, "sum"),
    (21, 4, True, False, "none"),
    (21, None, False, True, "none"),
    (22, 1, True, True, "mean"),
]
VOCAB, HIDDEN, EMB_HIDDEN, TOPK = 41, 12, 7, 6


def make_linear_inputs(gen, n, *, dtype=torch.float32, device="cpu", tied=True, bias=False, integer=False,
                       ignore_frac=0.25):
    """hidden [N, H], weight [V, H], labels [N], embedding [V, H_e] or None, bias [V] or None.

    integer: small integer hidden and weight, so that the logits are integers with many ties."""
    def draw(*shape, scale=1.0):
        if integer:
            return torch.randint(-1, 2, shape, generator=gen).double()
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    hidden = draw(n, HIDDEN)
    weight = draw(VOCAB, HIDDEN, scale=0.7)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels = labels.masked_fill(torch.rand(n, generator=gen) < ignore_frac, -100)
    embedding = None if tied else draw(VOCAB, EMB_HIDDEN)
    bias_t = draw(VOCAB, scale=0.5) if bias else None

    def cast(t):
        return None if t is None else t.to(dtype).to(device)
    return cast(hidden), cast(weight), labels.to(device), cast(embedding), cast(bias_t)


def run_both(hidden, weight, labels, embedding, bias, weights, backend, **options):
    """Values and gradients (``run_and_backprop``) of the fused-linear loss and of mixed_loss on the
    explicit logits.

    The objective weighs loss, ce and cos with ``weights`` for reduction="none"; for "mean" and
    "sum" (whose gradient the fused-linear mode computes in the forward, for the loss only) it
    is the weighted loss alone."""
    parts = ("loss", "ce", "cos") if options.get("reduction", "mean") == "none" else ("loss",)
    explicit_options = {key: value for key, value in options.items() if key != "chunk_size"}

    def fused(hidden, weight, embedding, bias):
        return linear_mixed_loss(hidden, weight, labels, embedding=embedding, bias=bias, backend=backend,
                                 return_parts=True, **options)

    def explicit(hidden, weight, embedding, bias):
        return mixed_loss(F.linear(hidden, weight, bias), labels, weight if embedding is None else embedding,
                          backend="reference", return_parts=True, **explicit_options)

    inputs = dict(hidden=hidden, weight=weight, embedding=embedding, bias=bias)
    return [run_and_backprop(fn, inputs, weights=weights[:len(parts)], parts=parts) for fn in (fused, explicit)]


def assert_agree(fused, explicit, rel, reduction):
    """Counts, values, cos_sim_sum and every gradient (same inputs, same dtypes, each relative to its largest entry)."""
    assert_agrees(fused, explicit, rel=rel, reduction=reduction, floors={"grad": RELATIVE_FLOOR})


@pytest.mark.parametrize("n, chunk_size, tied, bias, reduction", CASES)
def test_matches_mixed_loss_on_logits(backend, gen, n, chunk_size, tied, bias, reduction):
    name, device = backend
    hidden, weight, labels, embedding, bias_t = make_linear_inputs(gen, n, device=device, tied=tied, bias=bias)
    options = dict(alpha=0.5, temperature=0.7, topk=TOPK, reduction=reduction, chunk_size=chunk_size)
    weights = objective_weights(gen, reduction, n)
    fused, explicit = run_both(hidden, weight, labels, embedding, bias_t, weights, name, **options)
    assert_agree(fused, explicit, tolerance(torch.float32), reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_matches(backend, gen, dtype):
    name, device = backend
    backend_or_skip(name, device, dtype)
    hidden, weight, labels, embedding, bias_t = make_linear_inputs(gen, 19, dtype=dtype, device=device, bias=True)
    weights = objective_weights(gen, "mean", 19)
    fused, explicit = run_both(hidden, weight, labels, embedding, bias_t, weights, name, alpha=0.5, topk=TOPK,
                               chunk_size=6)
    assert fused["dhidden"].dtype == dtype
    # logits and gradients in the half dtype on both sides; test_linear_precision.py holds the fused
    # path's bfloat16 error to the unfused path's against float64
    assert_agree(fused, explicit, 2e-2, "mean")


@pytest.mark.parametrize("topk", [1, VOCAB, None])
def test_ties_and_whole_vocabulary(backend, gen, topk):
    """Integer logits tie at the k-th value: the lower index must win as in mixed_loss."""
    name, device = backend
    hidden, weight, labels, embedding, bias_t = make_linear_inputs(gen, 17, device=device, integer=True)
    weights = objective_weights(gen, "sum", 17)
    fused, explicit = run_both(hidden, weight, labels, embedding, bias_t, weights, name, alpha=0.6, temperature=1.5,
                               topk=topk if topk != 1 else TOPK, reduction="sum", chunk_size=5)
    assert_agree(fused, explicit, tolerance(torch.float32), "sum")


def test_shift_and_module(backend, gen):
    """[B, T, H] hidden with the causal shift, through the module."""
    name, device = backend
    hidden, weight, labels, _, _ = make_linear_inputs(gen, 3 * 8, device=device, ignore_frac=0.0)
    hidden, labels = hidden.reshape(3, 8, HIDDEN), labels.reshape(3, 8)
    module = LinearMixedLoss(alpha=0.3, topk=TOPK, shift=True, reduction="none", backend=name, chunk_size=5)
    got = module(hidden, weight, labels)
    want = mixed_loss(F.linear(hidden, weight), labels, weight, alpha=0.3, topk=TOPK, shift=True, reduction="none")
    assert got.shape == (3, 7)
    assert_close_rel(got, want, tolerance(torch.float32), "loss", floor=1.0)
    assert "chunk_size=5" in repr(module)


def test_parts_of_a_reduced_loss_refuse_a_gradient(gen):
    """mean / sum compute the loss's gradient in the forward: differentiating .ce must raise, not
    silently give the loss's gradient; .loss alone and reduction='none' parts work."""
    hidden, weight, labels, _, _ = make_linear_inputs(gen, 10)
    hidden.requires_grad_()
    out = linear_mixed_loss(hidden, weight, labels, topk=TOPK, return_parts=True, backend="reference")
    with pytest.raises(RuntimeError, match="reduction='none'"):
        (out.loss + out.ce).backward()
    out = linear_mixed_loss(hidden, weight, labels, topk=TOPK, return_parts=True, backend="reference",
                            reduction="none")
    out.ce.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_alpha_zero_leaves_an_untied_embedding_without_gradient(backend, gen, reduction):
    """As mixed_loss: without the cosine term the loss does not depend on the embedding."""
    name, device = backend
    hidden, weight, labels, embedding, _ = make_linear_inputs(gen, 8, device=device, tied=False)
    for t in (hidden, weight, embedding):
        t.requires_grad_()
    linear_mixed_loss(hidden, weight, labels, embedding=embedding, alpha=0.0, topk=TOPK, backend=name,
                      reduction=reduction, chunk_size=3).sum().backward()
    assert embedding.grad is None
    assert hidden.grad is not None and weight.grad is not None


def test_every_position_ignored(backend, gen):
    name, device = backend
    hidden, weight, labels, _, bias_t = make_linear_inputs(gen, 9, device=device, bias=True)
    labels = torch.full_like(labels, -100)
    hidden.requires_grad_(), weight.requires_grad_(), bias_t.requires_grad_()
    loss = linear_mixed_loss(hidden, weight, labels, bias=bias_t, topk=TOPK, backend=name, chunk_size=4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for t in (hidden, weight, bias_t):
        assert torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("name", ["reference", "native"])
def test_gradients_are_bitwise_reproducible(name, gen):
    backend_or_skip(name, "cpu")
    hidden, weight, labels, embedding, bias_t = make_linear_inputs(gen, 30, tied=False, bias=True)
    weights = objective_weights(gen, "mean", 30)
    first = run_both(hidden, weight, labels, embedding, bias_t, weights, name, topk=TOPK, chunk_size=7)[0]
    second = run_both(hidden, weight, labels, embedding, bias_t, weights, name, topk=TOPK, chunk_size=7)[0]
    assert first.keys() == second.keys() and {"dhidden", "dweight", "dembedding", "dbias"} <= first.keys()
    for key in first:  # the values and counts as well as the gradients
        assert torch.equal(first[key], second[key]), key


MEMORY_PROBE = """
import json, sys
import torch
from bench.measure import peak_bytes
from fused_cosloss import linear_mixed_loss
name, reduction, vocab, hidden_size, chunk, topk = sys.argv[1], sys.argv[2], 8000, 32, 128, 16
gen = torch.Generator().manual_seed(0)
weight = torch.randn(vocab, hidden_size, generator=gen).requires_grad_()
peaks = {}
for n in (512, 4096):
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    def step():
        weight.grad = hidden.grad = None
        linear_mixed_loss(hidden, weight, labels, topk=topk, backend=name, chunk_size=chunk,
                          reduction=reduction).sum().backward()
    step()  # the first call's one-off allocations are not the loss's
    peaks[n] = peak_bytes("cpu", lambda: None, step)[0]
print(json.dumps(peaks))
"""


@pytest.mark.parametrize("name, reduction", [("reference", "mean"), ("native", "mean"), ("native", "none")])
def test_peak_memory_does_not_grow_with_tokens(name, reduction):
    """At a fixed chunk size, going from 512 to 4096 positions adds only the O(N * (K + H))
    saved per position, far less than the logits would. Measured as the resident-set
    high-water mark in a fresh process whose malloc hands every large block straight to
    mmap (glibc's adaptive threshold would otherwise keep freed chunks resident, at random).
    "mean" computes the gradients in the forward; "none" saves per-position state and recomputes."""
    backend_or_skip(name, "cpu")
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, name, reduction], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = {int(n): value for n, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    vocab, hidden_size, topk = 8000, 32, 16
    growth = peaks[4096] - peaks[512]
    # saved state and d hidden: a generous 16 floats per (K + H) entry of each added position
    allowed = (4096 - 512) * (topk + hidden_size) * 4 * 16
    assert growth <= allowed, f"peak grew by {growth} bytes from 512 to 4096 positions (allowed {allowed})"
    logits_bytes = 4096 * vocab * 4
    assert peaks[4096] < logits_bytes / 4, f"peak {peaks[4096]} bytes is not well below the logits' {logits_bytes}"


def test_bad_arguments_name_themselves():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        (dict(weight=torch.randn(10, 9)), ValueError, "weight"),
        (dict(weight=w.double()), TypeError, "weight"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(embedding=torch.randn(11, 3)), ValueError, "embedding"),
        (dict(labels=y[:3]), ValueError, "labels"),
        (dict(labels=y.float()), TypeError, "labels"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(hidden=h.long()), TypeError, "hidden"),
        (dict(labels=torch.full((4,), 10)), ValueError, "labels"),
        (dict(shift=True), ValueError, "hidden"),
        (dict(alpha=2.0), ValueError, "alpha"),
    ]
    for change, error, name in cases:
        args = dict(hidden=h, weight=w, labels=y)
        args.update(change)
        positional = [args.pop(key) for key in ("hidden", "weight", "labels")]
        with pytest.raises(error, match=name):
            linear_mixed_loss(*positional, **args)
