"""Input generators and comparisons shared by the tests."""
from __future__ import annotations

import torch


def make_inputs(gen, n, vocab, hidden, *, dtype=torch.float32, emb_dtype=None, ignore_frac=0.25,
                ignore_index=-100, ties=False, neg_inf_frac=0.0, scale=2.0, device="cpu"):
    """Random logits [N, V], labels [N] and embedding [V, H] drawn from ``gen``.

    ties: integer-valued logits in [-2, 2], so many entries tie at the k-th value.
    neg_inf_frac: that fraction of each row is -inf (never the label).
    """
    if ties:
        logits = torch.randint(-2, 3, (n, vocab), generator=gen).double()
    else:
        logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if neg_inf_frac > 0:
        masked = torch.rand(n, vocab, generator=gen) < neg_inf_frac
        masked[torch.arange(n), labels] = False
        logits = logits.masked_fill(masked, float("-inf"))
    ignored = torch.rand(n, generator=gen) < ignore_frac
    labels = labels.masked_fill(ignored, ignore_index)
    embedding = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    return (
        logits.to(dtype).to(device),
        labels.to(device),
        embedding.to(emb_dtype or dtype).to(device),
    )


def assert_close_rel(actual, expected, rel, what="", floor=1e-30):
    """max |actual - expected| <= rel * max(max |expected|, floor): error relative to the tensor's scale.

    floor: the smallest scale, for quantities whose natural size is known (a cosine distance is O(1)
    however close to 0 it happens to be)."""
    actual = torch.as_tensor(actual, dtype=torch.float64 if not torch.is_tensor(actual) else None).detach().double().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64 if not torch.is_tensor(expected) else None).detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    finite = ~expected.isnan()
    if not finite.any():
        return
    a, e = actual[finite], expected[finite]
    assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), f"{what}: inf differ"
    a, e = a[~e.isinf()], e[~e.isinf()]
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), floor)
    err = (a - e).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:.1e} * scale {scale:.3e}"


def tolerance(dtype) -> float:
    """Relative tolerance of a float32-accumulating backend for inputs of this dtype."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


def gradient_tolerance(dtype, temperature: float) -> float:
    """Relative tolerance of the logits and embedding gradients at temperature T.

    The cosine part of the logits gradient is w_v (s_v - s_bar) / T, and s_v - s_bar is
    a difference of O(1) dot products (s_bar is 0 analytically): its absolute rounding
    error of a few float epsilons is multiplied by 1 / T. Below T = 1/4 the tolerance
    grows with 1 / T accordingly; above it, the plain tolerance of the dtype applies."""
    return tolerance(dtype) * max(1.0, 0.25 / temperature)
