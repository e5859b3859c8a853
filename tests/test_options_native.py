"""The loss options in the native CPU kernel (docs/spec.md, "Loss options"): logit scale, soft-cap
and label smoothing, and the lse output and its gradient coefficient.

``native.forward_rows`` / ``native.backward_rows`` are called directly and held to the float64
oracle (tests/spec_oracle.py): per row ce, cos, lse and argmax == label, and the gradients of
``sum_n grad_ce[n] ce_n + grad_cos[n] cos_n + grad_lse[n] lse_n`` for random per-row coefficients
(zero at ignored rows, as the loss gives them) against autograd of the oracle.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss.options import LossOptions
from helpers import RELATIVE_FLOOR, assert_close_rel, gradient_tolerance, make_inputs, tolerance
from spec_oracle import spec_rows

IGNORE = -100
OPTION_SETS = {  # name: (loss options, spread of the random logits: enough for the cap to bend them)
    "scale0.5": (dict(logit_scale=0.5), 2.0),
    "scale2": (dict(logit_scale=2.0), 2.0),
    "cap30": (dict(softcap=30.0), 30.0),
    "cap2": (dict(softcap=2.0), 2.0),
    "smooth0.1": (dict(label_smoothing=0.1), 2.0),
    "smooth1": (dict(label_smoothing=1.0), 2.0),
    "scale2-cap2-smooth0.1": (dict(logit_scale=2.0, softcap=2.0, label_smoothing=0.1), 2.0),
    "scale0.5-cap30-smooth1": (dict(logit_scale=0.5, softcap=30.0, label_smoothing=1.0), 40.0),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def native():
    """The fused_cosloss.native module, skipped (or failed when required) where it cannot run."""
    backend_or_skip("native", "cpu")
    from fused_cosloss import native as module

    return module


def loss_options(k, *, temperature=0.7, with_cos=True, **options) -> LossOptions:
    return LossOptions(temperature, k, IGNORE, with_cos, **options)


def coefficients(gen, labels):
    """Random per-row grad_ce, grad_cos, grad_lse in [-1, 1), zero at ignored rows."""
    valid = (labels != IGNORE).double()
    return tuple((torch.rand(labels.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * valid for _ in range(3))


def native_run(native, logits, labels, embedding, options, grads, **backward_options):
    """forward_rows, then backward_rows with the coefficients ``grads`` = (grad_ce, grad_cos, grad_lse)."""
    out = native.forward_rows(logits, labels, embedding, options)
    grad_ce, grad_cos, grad_lse = (g.float() if g is not None else None for g in grads)
    dlogits, dembedding = native.backward_rows(logits, labels, embedding, out.saved, grad_ce, grad_cos, options,
                                               need_logits_grad=True, need_embedding_grad=True, grad_lse=grad_lse,
                                               **backward_options)
    return out, dlogits, dembedding


def oracle_run(logits, labels, embedding, options: LossOptions, grads):
    """(ce, cos, lse, correct, dlogits, dembedding) of the float64 oracle, gradients by autograd."""
    z = logits.detach().double().requires_grad_()
    e = embedding.detach().double().requires_grad_()
    ce, _, cos, correct, _, lse = spec_rows(
        z, labels, e, options.temperature, options.k, IGNORE, with_lse=True,
        logit_scale=None if options.logit_scale == 1.0 else options.logit_scale, softcap=options.softcap,
        label_smoothing=options.label_smoothing)
    grad_ce, grad_cos, grad_lse = grads
    objective = (grad_ce * ce).sum() + (grad_cos * cos).sum() + (grad_lse * lse).sum()
    dz, de = torch.autograd.grad(objective, (z, e)) if objective.requires_grad else (z * 0, e * 0)
    return ce.detach(), cos.detach(), lse.detach(), torch.tensor(correct, dtype=torch.bool), dz, de


def assert_matches_oracle(native, logits, labels, embedding, options, grads):
    """Values to the dtype's tolerance against max(|expected|, 1); argmax == label exactly; the
    gradients, in the inputs' dtypes, relative to their largest entry."""
    dtype = logits.dtype
    out, dlogits, dembedding = native_run(native, logits, labels, embedding, options, grads)
    ce, cos, lse, correct, dz, de = oracle_run(logits, labels, embedding, options, grads)
    rel = tolerance(dtype)
    for name, actual, expected in (("ce", out.ce, ce), ("cos", out.cos, cos), ("lse", out.lse, lse)):
        assert actual.dtype == torch.float32 and actual.shape == expected.shape, name
        assert_close_rel(actual, expected, rel, name, floor=1.0)
    assert torch.equal(out.correct, correct), "argmax == label"
    assert dlogits.dtype == logits.dtype and dembedding.dtype == embedding.dtype
    grad_rel = gradient_tolerance(dtype, options.temperature)
    assert_close_rel(dlogits, dz, grad_rel, "dlogits", floor=RELATIVE_FLOOR)
    assert_close_rel(dembedding, de, grad_rel, "dembedding", floor=RELATIVE_FLOOR)
    return out, dlogits, dembedding


# --------------------------------------------------------------------------- each option, alone and combined


@pytest.mark.parametrize("k", [1, 13, 61], ids=["K1", "K<V", "K>=V"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_options_match_oracle(native, option_set, dtype, k, gen):
    backend_or_skip("native", "cpu", dtype)
    options, spread = OPTION_SETS[option_set]
    logits, labels, embedding = make_inputs(gen, 8, 61, 8, dtype=dtype, scale=spread)
    labels[0] = IGNORE
    assert_matches_oracle(native, logits, labels, embedding, loss_options(k, **options), coefficients(gen, labels))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option_set, k, temperature", [("cap2", 256, 0.7), ("scale2-cap2-smooth0.1", 37, 0.05),
                                                        ("scale0.5-cap30-smooth1", 256, 1.5)])
def test_options_match_oracle_with_block_selection(native, option_set, k, temperature, dtype, gen):
    """A vocabulary large enough for the kernel's block-bounded top-k scan (and several backward tiles)."""
    backend_or_skip("native", "cpu", dtype)
    options, spread = OPTION_SETS[option_set]
    logits, labels, embedding = make_inputs(gen, 6, 4001, 24, dtype=dtype, scale=spread)
    assert_matches_oracle(native, logits, labels, embedding, loss_options(k, temperature=temperature, **options),
                          coefficients(gen, labels))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_without_cosine_term(native, dtype, gen):
    """with_cos=False: ce, lse and the logits gradient with every option on; cos 0, no embedding gradient."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 8, 301, 8, dtype=dtype)
    options = loss_options(5, with_cos=False, logit_scale=2.0, softcap=2.0, label_smoothing=0.1)
    grads = coefficients(gen, labels)
    out, dlogits, dembedding = native_run(native, logits, labels, embedding, options, grads)
    ce, _, lse, correct, dz, _ = oracle_run(logits, labels, embedding, options, (grads[0], grads[1] * 0, grads[2]))
    assert_close_rel(out.ce, ce, tolerance(dtype), "ce", floor=1.0)
    assert_close_rel(out.lse, lse, tolerance(dtype), "lse", floor=1.0)
    assert torch.equal(out.correct, correct) and torch.all(out.cos == 0) and dembedding is None
    assert_close_rel(dlogits, dz, tolerance(dtype), "dlogits", floor=RELATIVE_FLOOR)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_made_by_the_cap_go_to_the_lower_index(native, dtype, gen):
    """1000, 1008 and 1016 (exact in bfloat16 too) all become 30 under a cap of 30, in float32 and in
    float64: S and the argmax take the lowest indices among them, where the uncapped row would take
    the largest logits."""
    backend_or_skip("native", "cpu", dtype)
    row = torch.tensor([0.5, 1000.0, -3.0, 1008.0, 2.0, 1016.0, -1.0, 3.0], dtype=torch.float64)
    logits = row.repeat(4, 1).to(dtype)
    labels = torch.tensor([3, 1, 5, 0])
    embedding = torch.randn(8, 6, generator=gen, dtype=torch.float64).to(dtype)
    grads = coefficients(gen, labels)
    for k, capped_set, uncapped_set in ((1, [1], [5]), (2, [1, 3], [3, 5])):
        for softcap, expected_set in ((30.0, capped_set), (None, uncapped_set)):
            options = loss_options(k, softcap=softcap)
            out, _, _ = assert_matches_oracle(native, logits, labels, embedding, options, grads)
            assert out.saved[1].tolist() == [expected_set] * 4, f"S for K={k}, softcap={softcap}"
            first_max = 1 if softcap is not None else 5
            assert out.correct.tolist() == [bool(y == first_max) for y in labels.tolist()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(softcap=2.0), dict(softcap=30.0, logit_scale=2.0, label_smoothing=0.1)],
                         ids=["cap2", "cap30-scale2-smooth0.1"])
def test_negative_infinite_logits_under_a_cap_are_finite(native, options, dtype, gen):
    """-inf becomes -c: finite ce, cos and lse (mass at -c, as the capped models have), and a zero
    gradient at those entries (1 - tanh^2 = 0), also in a row with fewer finite entries than K."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 6, 301, 8, dtype=dtype, neg_inf_frac=0.5, ignore_frac=0.0)
    logits[0] = float("-inf")
    logits[0, labels[0]] = 1.0
    out, dlogits, _ = assert_matches_oracle(native, logits, labels, embedding, loss_options(20, **options),
                                            coefficients(gen, labels))
    assert torch.isfinite(out.ce).all() and torch.isfinite(out.cos).all() and torch.isfinite(out.lse).all()
    assert torch.isfinite(dlogits).all()
    assert torch.all(dlogits[logits == float("-inf")] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_label_smoothing_with_a_negative_infinite_logit_gives_infinite_ce(native, dtype, gen):
    """Without a cap a -inf entry makes the smoothed ce +inf, as F.cross_entropy gives; the gradient stays finite."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 5, 101, 8, dtype=dtype, ignore_frac=0.0)
    logits[1, (labels[1] + 1) % 101] = float("-inf")
    logits[3, :50] = float("-inf")
    logits[3, labels[3]] = 0.0
    options = loss_options(7, label_smoothing=0.1)
    out, dlogits, _ = assert_matches_oracle(native, logits, labels, embedding, options, coefficients(gen, labels))
    expected = F.cross_entropy(logits.double(), labels, label_smoothing=0.1, reduction="none")
    assert torch.equal(out.ce.isinf(), expected.isinf()) and out.ce.isinf().tolist() == [False, True, False, True, False]
    assert_close_rel(out.ce, expected, tolerance(dtype), "ce against F.cross_entropy", floor=1.0)
    assert torch.isfinite(dlogits).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_position_ignored(native, dtype, gen):
    """Zeros everywhere: ce, cos, lse, argmax == label, and both gradients, with every option on."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 5, 61, 8, dtype=dtype, ignore_frac=1.0)
    options = loss_options(6, logit_scale=2.0, softcap=2.0, label_smoothing=0.5)
    grads = tuple(torch.rand(5, generator=gen, dtype=torch.float64) for _ in range(3))  # nonzero: still ignored
    out, dlogits, dembedding = native_run(native, logits, labels, embedding, options, grads)
    for name in ("ce", "cos", "lse"):
        assert torch.equal(getattr(out, name), torch.zeros(5)), name
    assert not out.correct.any()
    assert torch.all(dlogits == 0) and torch.all(dembedding == 0)


# --------------------------------------------------------------------------- the options' paths against the plain one


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_power_of_two_scale_equals_the_plain_kernel_on_scaled_logits(native, scale, dtype, gen):
    """s z is exact for s a power of two, so the scaled kernel must give bitwise what the plain kernel
    gives on the logits s z, and a logits gradient s times as large (the rest of the gradient identical)."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 12, 3001, 16, dtype=dtype)
    grads = coefficients(gen, labels)
    scaled, dz_scaled, de_scaled = native_run(native, logits, labels, embedding,
                                              loss_options(50, logit_scale=scale), grads)
    plain, dz_plain, de_plain = native_run(native, logits * scale, labels, embedding, loss_options(50), grads)
    for name in ("ce", "cos", "correct", "lse"):
        assert torch.equal(getattr(scaled, name), getattr(plain, name)), name
    for i, (a, b) in enumerate(zip(scaled.saved, plain.saved)):
        assert torch.equal(a, b), f"saved[{i}]"
    assert torch.equal(dz_scaled, dz_plain * scale) and torch.equal(de_scaled, de_plain)


def test_zero_lse_coefficients_equal_no_lse_term(native, gen):
    """grad_lse = 0 everywhere gives bitwise the gradients of grad_lse=None (the plain kernel)."""
    logits, labels, embedding = make_inputs(gen, 8, 2001, 16)
    grad_ce, grad_cos, _ = coefficients(gen, labels)
    options = loss_options(20)
    _, dz_none, de_none = native_run(native, logits, labels, embedding, options, (grad_ce, grad_cos, None))
    _, dz_zero, de_zero = native_run(native, logits, labels, embedding, options,
                                     (grad_ce, grad_cos, torch.zeros_like(grad_ce)))
    assert torch.equal(dz_none, dz_zero) and torch.equal(de_none, de_zero)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_gradient_with_the_options(native, dtype, gen):
    """The logits gradient written over the logits (each tile of z' is recomputed from z before it is
    overwritten) equals the one written to a new tensor."""
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 8, 5003, 16, dtype=dtype)
    options = loss_options(30, logit_scale=2.0, softcap=2.0, label_smoothing=0.1)
    grads = coefficients(gen, labels)
    _, expected, _ = native_run(native, logits, labels, embedding, options, grads)
    overwritten = logits.clone()
    out = native.forward_rows(overwritten, labels, embedding, options)
    dlogits, _ = native.backward_rows(overwritten, labels, embedding, out.saved, grads[0].float(), grads[1].float(),
                                      options, need_logits_grad=True, need_embedding_grad=False, inplace=True,
                                      grad_lse=grads[2].float())
    assert dlogits.data_ptr() == overwritten.data_ptr() and torch.equal(dlogits, expected)


@pytest.mark.parametrize("with_cos", [True, False])
def test_fake_forward_rows_has_the_real_shapes(native, with_cos, gen):
    logits, labels, embedding = make_inputs(gen, 4, 97, 8)
    options = loss_options(9, with_cos=with_cos, softcap=5.0, label_smoothing=0.2)
    real, fake = (f(logits, labels, embedding, options) for f in (native.forward_rows, native.fake_forward_rows))
    assert real._fields == fake._fields
    for a, b in zip((*real[:4], *real.saved), (*fake[:4], *fake.saved)):
        assert a.shape == b.shape and a.dtype == b.dtype
