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


# ------------------------------------------------------------------------------------------------
# Run, backprop, compare: the one pair every agreement test goes through


OUTPUT_NAMES = ("loss", "ce", "cos", "n_valid", "n_correct", "cos_sim_sum", "z_loss")
RELATIVE_FLOOR = 1e-30  # assert_close_rel's default: the error relative to the largest entry alone
UNIT_FLOORS = {"loss": 1.0, "ce": 1.0, "cos": 1.0, "cos_sim_sum": 1.0, "z_loss": 1.0, "grad": RELATIVE_FLOOR}
"""Floors for ``assert_agrees`` that do not depend on the reduction: every value against
max(|expected|, 1), every gradient relative to its largest entry."""


def objective_weights(gen, reduction, n):
    """Random weights in [0.5, 1.5) for loss, ce and cos: scalars, or [N] vectors for reduction='none'."""
    size = (3,) if reduction != "none" else (3, n)
    return (torch.rand(size, generator=gen, dtype=torch.float64) + 0.5).unbind(0)


class Backprop(dict):
    """What ``run_and_backprop`` gives: the outputs by name ("loss", "ce", "cos", "n_valid",
    "n_correct", "cos_sim_sum", those ``fn`` returned) and the gradient of every differentiable
    input as "d" + its name (None where none arrived); as items and as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def run_and_backprop(fn, tensors, *, weights=None, parts=("loss", "ce", "cos")):
    """``fn(**inputs)`` on fresh leaf copies of the floating-point tensors in ``tensors`` (a dict
    name -> tensor; other entries, such as labels or None, are passed as they are), then the
    backward of the objective sum_i (weights[i] * outputs[parts[i]]).sum().

    fn returns a MixedLossOutput, a tuple in its order (loss, ce, cos, n_valid, n_correct,
    cos_sim_sum; a prefix will do) or the loss alone. weights: one per part, scalars or tensors
    that broadcast against the part ([N] for reduction='none'); None weighs each part 1. An
    objective that does not depend on the inputs (every position ignored, in a float64 oracle)
    gives zero gradients, which is its derivative.
    """
    leaves = {name: t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
              for name, t in tensors.items()}
    out = fn(**leaves)
    outputs = dict(zip(OUTPUT_NAMES, (out,) if torch.is_tensor(out) else tuple(out)))
    weights = (1.0,) * len(parts) if weights is None else weights
    assert len(weights) == len(parts), f"{len(weights)} weights for the parts {parts}"
    objective = sum((torch.as_tensor(w, dtype=outputs[part].dtype, device=outputs[part].device) * outputs[part]).sum()
                    for w, part in zip(weights, parts))
    differentiable = {name: t for name, t in leaves.items() if torch.is_tensor(t) and t.requires_grad}
    if objective.requires_grad:
        objective.backward()
        grads = {f"d{name}": t.grad for name, t in differentiable.items()}
    else:
        grads = {f"d{name}": torch.zeros_like(t) for name, t in differentiable.items()}
    return Backprop(outputs, **grads)


def _natural_floors(reduction, n_valid):
    """The size of one position's contribution: a value's (ce_n and the cosine distance are O(1)
    however close to 0 one happens to be, and their rounding error is absolute; a sum of N_valid
    of them is O(N_valid)) and a gradient's (O(1), O(1 / N_valid) under the mean, however small
    softmax - onehot or 1 - cos happens to be)."""
    value = float(max(1, n_valid)) if reduction == "sum" else 1.0
    return {"loss": value, "ce": value, "cos": value, "z_loss": value, "cos_sim_sum": float(max(1, n_valid)),
            "grad": 1.0 / max(1, n_valid) if reduction == "mean" else 1.0}


def assert_agrees(actual, expected, *, rel, grad_rel=None, reduction="mean", what="", floors=None):
    """``actual`` agrees with ``expected`` (both from ``run_and_backprop``):

    - n_valid and n_correct exactly equal;
    - loss, ce, cos and cos_sim_sum (and z_loss where either side has it: then both must) to ``rel``
      (``assert_close_rel``), and cos_sim_sum's error also within rel * max(1, N_valid) (a sum of
      cosines in [-1, 1] can cancel; NaN fails);
    - the same gradients (by input name), none missing, of the same dtype, to ``grad_rel`` (else ``rel``).

    Every comparison is against max(|expected|, floor). The floors are by default those of one
    position's contribution (``_natural_floors``: values 1, N_valid for 'sum'; gradients 1 / N_valid
    for 'mean', else 1); ``floors`` replaces some: keys "loss", "ce", "cos", "cos_sim_sum", and "grad"
    for every gradient (``RELATIVE_FLOOR``: relative to the largest entry alone; ``UNIT_FLOORS``).
    """
    prefix = f"{what}: " if what else ""
    for key in ("n_valid", "n_correct"):
        assert int(actual[key]) == int(expected[key]), f"{prefix}{key}: {int(actual[key])} != {int(expected[key])}"
    n_valid = int(expected["n_valid"])
    unknown = set(floors or {}) - {"loss", "ce", "cos", "cos_sim_sum", "z_loss", "grad"}
    assert not unknown, f"floors for unknown keys {sorted(unknown)}"
    floor = {**_natural_floors(reduction, n_valid), **(floors or {})}
    values = ("loss", "ce", "cos", "cos_sim_sum")
    if "z_loss" in actual or "z_loss" in expected:
        assert "z_loss" in actual and "z_loss" in expected, f"{prefix}z_loss on one side only"
        values += ("z_loss",)
    for key in values:
        assert_close_rel(actual[key], expected[key], rel, prefix + key, floor=floor[key])
    error = abs(float(actual["cos_sim_sum"]) - float(expected["cos_sim_sum"]))
    assert error <= rel * max(1, n_valid), f"{prefix}cos_sim_sum: error {error:.3e} > {rel:.1e} * {max(1, n_valid)}"
    grad_keys = sorted(key for key in expected if key.startswith("d"))
    assert sorted(key for key in actual if key.startswith("d")) == grad_keys, f"{prefix}not the same inputs"
    for key in grad_keys:
        assert actual[key] is not None and expected[key] is not None, f"{prefix}{key}: no gradient arrived"
        assert actual[key].dtype == expected[key].dtype, f"{prefix}{key}: {actual[key].dtype} != {expected[key].dtype}"
        assert_close_rel(actual[key], expected[key], grad_rel or rel, prefix + key, floor=floor["grad"])
