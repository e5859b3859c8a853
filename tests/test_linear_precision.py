"""The fused-linear mode's bfloat16 gradients: as precise as the unfused bfloat16 path, and
rounded once.

``linear_mixed_loss`` sums the weight, bias and embedding gradients over chunks of positions.
Rounding each chunk's ``dz.T @ hidden`` to bfloat16 before that sum (as Liger-Kernel's fused
linear cross-entropy does) adds one bfloat16 rounding per chunk; the package keeps every
chunk's product in float32 and rounds the sum once. Two checks, at many small chunks:

- Cut Cross-Entropy's criterion at N = 16384: the error of every gradient against float64 is
  no worse than 4x that of the unfused bfloat16 path (``mixed_loss(hidden @ weight.T + bias)``
  on the same inputs) plus a small floor.
- Rounded once: the weight and bias gradients are within one bfloat16 ulp of the float64 sum
  of the very same per-position logits gradients (the unfused path's, of the same backend:
  bitwise the fused path's, since each row's logits and gradient are computed alike), and the
  embedding gradient within one ulp of the unfused path's (one float32 sum, rounded once).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss import linear_autograd as linear_function, linear_mixed_loss, mixed_loss

FACTOR = 4.0
FLOOR = 2.0**-11  # of the gradient's largest entry: at most an eighth of a bfloat16 ulp there
OPTIONS = dict(alpha=0.5, temperature=0.7, topk=8)
NAMES = ("hidden", "weight", "embedding", "bias")


def draw(gen, n, vocab, hidden, emb_hidden, *, tied):
    """hidden [N, H], weight [V, H], labels (a fifth ignored), embedding [V, H_e] or None, bias [V],
    all exactly representable in bfloat16 (given as float64)."""
    def bf16_values(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).bfloat16().double()

    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.2] = -100
    embedding = None if tied else bf16_values(vocab, emb_hidden)
    return (bf16_values(n, hidden), bf16_values(vocab, hidden, scale=hidden**-0.5), labels, embedding,
            bf16_values(vocab, scale=0.5))


def gradients(loss_fn, inputs, dtype):
    """{name: gradient} of ``loss_fn(hidden, weight, embedding, bias)`` on fresh leaves of ``dtype``."""
    leaves = {name: None if t is None else t.detach().to(dtype, copy=True).requires_grad_()
              for name, t in zip(NAMES, inputs)}
    loss_fn(*leaves.values()).backward()
    return {name: t.grad for name, t in leaves.items() if t is not None}


def fused(backend, labels, chunk_size, reduction="mean"):
    """The summed loss of linear_mixed_loss ("none": gradients in the backward, else in the forward)."""
    return lambda h, w, e, b: linear_mixed_loss(h, w, labels, embedding=e, bias=b, backend=backend,
                                                chunk_size=chunk_size, reduction=reduction, **OPTIONS).sum()


def unfused(backend, labels, reduction="mean"):
    return lambda h, w, e, b: mixed_loss(F.linear(h, w, b), labels, w if e is None else e, backend=backend,
                                         reduction=reduction, **OPTIONS).sum()


def max_error(actual, truth):
    return (actual.double() - truth).abs().max().item()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name, chunk_size", [("reference", 256), ("native", 64)])
def test_bf16_error_no_worse_than_the_unfused_bf16_path(gen, name, chunk_size, tied):
    """N = 16384 positions in 64 (reference) or 256 (native) chunks. A guard of the whole: on such
    inputs the largest errors are the final roundings both paths share, so per-chunk rounding passes
    it too; the tests below tell the two apart."""
    backend_or_skip(name, "cpu", torch.bfloat16)
    hidden, weight, labels, embedding, bias = draw(gen, 16384, 64, 32, 16, tied=tied)
    inputs = (hidden, weight, embedding, bias)
    truth = gradients(unfused("reference", labels), inputs, torch.float64)
    naive = gradients(unfused(name, labels), inputs, torch.bfloat16)
    ours = gradients(fused(name, labels, chunk_size), inputs, torch.bfloat16)
    assert ours.keys() == truth.keys()
    for key, exact in truth.items():
        assert ours[key].dtype == torch.bfloat16, key
        bound = FACTOR * max_error(naive[key], exact) + FLOOR * exact.abs().max().item()
        err = max_error(ours[key], exact)
        assert err <= bound, (f"{name} d{key}: error {err:.3e} against float64 is above {bound:.3e} "
                              f"({FACTOR}x the unfused bfloat16 path's {max_error(naive[key], exact):.3e} + floor)")


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |values| (8 significant bits)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.exp2(exponent - 7)


def assert_within_one_ulp(actual, expected, what):
    """|actual - expected| <= one bfloat16 ulp of expected (rounding once gives half of one; a float32
    sum in another order may land on the neighbour), plus 2^-16 of the largest entry for the float32
    sum's own rounding where the exact value nearly cancels."""
    expected = expected.double()
    slack = bf16_ulp(expected) + 2.0**-16 * expected.abs().max()
    excess = (actual.double() - expected).abs() / slack
    worst = int(excess.argmax())
    assert excess.max() <= 1.0, (f"{what}: {int((excess > 1).sum())} of {excess.numel()} entries are more than one "
                                 f"bfloat16 ulp off the sum rounded once, e.g. {actual.flatten()[worst].item():.6e} "
                                 f"against {expected.flatten()[worst].item():.6e}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunk_product_enters_the_float32_sum_unrounded(gen, device, monkeypatch):
    """The weight gradient's accumulation step on its own, on each device's code path (CPU: the
    logits gradient upcast a block of the vocabulary at a time; CUDA: a matmul with a float32
    output): acc + dz.T @ h to float32 precision, the vocabulary in blocks that do not divide it."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setattr(linear_function, "PRODUCT_BLOCK_ELEMENTS", 600)
    dz = torch.randn(40, 77, generator=gen, dtype=torch.float64).bfloat16()
    h = torch.randn(40, 24, generator=gen, dtype=torch.float64).bfloat16()
    start = torch.randn(77, 24, generator=gen)
    acc = start.to(device, copy=True)
    linear_function._add_transposed_product(acc, dz.to(device), h.to(device))
    exact = start.double() + dz.double().T @ h.double()
    terms = start.double().abs() + dz.double().abs().T @ h.double().abs()
    # float32 sums of 41 terms err by well under 2^-16 of their absolute sum; a bfloat16 rounding
    # of the product errs by up to 2^-9 of it
    worst = ((acc.double().cpu() - exact).abs() / terms).max().item()
    assert worst <= 2.0**-16, f"the sum errs by {worst:.2e} of its terms' absolute sum (float32: < 2^-16)"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name, n, chunk_size", [("reference", 4096, 64), ("native", 4096, 16), ("triton", 24, 6)])
def test_bf16_weight_bias_and_embedding_gradients_are_rounded_once(gen, name, n, chunk_size, reduction):
    """Both gradient paths: computed in the forward ("mean") and recomputed in the backward ("none")."""
    backend_or_skip(name, "cpu", torch.bfloat16)
    hidden, weight, labels, embedding, bias = draw(gen, n, 64, 32, 16, tied=False)
    leaves = [t.bfloat16().requires_grad_() for t in (hidden, weight, embedding, bias)]
    h, w, e, b = leaves
    logits = F.linear(h, w, b)
    logits.retain_grad()
    mixed_loss(logits, labels, e, backend=name, reduction=reduction, **OPTIONS).sum().backward()
    dz = logits.grad.double()
    unfused_embedding_grad = e.grad

    ours = gradients(fused(name, labels, chunk_size, reduction), (hidden, weight, embedding, bias), torch.bfloat16)
    assert_within_one_ulp(ours["weight"], dz.T @ hidden, "d weight")
    assert_within_one_ulp(ours["bias"], dz.sum(dim=0), "d bias")
    assert_within_one_ulp(ours["embedding"], unfused_embedding_grad, "d embedding")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_dense_path_embedding_gradient_is_rounded_once(gen, monkeypatch, reduction):
    """The Triton backend's dense path (K above its sparse limit) adds each chunk's embedding
    gradient to the float32 accumulator unrounded, as the sparse path does."""
    backend_or_skip("triton", "cpu", torch.bfloat16)
    from fused_cosloss.triton_ops.config import CONFIG

    monkeypatch.setattr(CONFIG, "sparse_max_k", 4)
    hidden, weight, labels, embedding, bias = draw(gen, 24, 64, 32, 16, tied=False)
    options = dict(OPTIONS, topk=None)
    e = embedding.bfloat16().requires_grad_()
    logits = F.linear(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16())
    mixed_loss(logits, labels, e, backend="triton", reduction=reduction, **options).sum().backward()
    leaves = [t.bfloat16().requires_grad_() for t in (hidden, weight, embedding, bias)]
    h, w, e2, b = leaves
    loss = linear_mixed_loss(h, w, labels, embedding=e2, bias=b, backend="triton", chunk_size=6,
                             reduction=reduction, **options)
    loss.sum().backward()
    assert_within_one_ulp(e2.grad, e.grad, "d embedding")
