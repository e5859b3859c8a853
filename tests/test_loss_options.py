"""The loss options of docs/spec.md ("Loss options"): logit_scale, softcap, label_smoothing, z_loss
and the per-position weight, on every backend, in the fused-linear mode and under torch.compile.

The reference is held to the float64 autograd of the literal transcription (tests/spec_oracle.py),
every kernel backend to the reference; with alpha = 0 the loss is also checked against
``F.cross_entropy(label_smoothing=...)`` and against the soft-cap and z-loss semantics of
Liger-Kernel's cross-entropy, re-derived here in closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKEND_PARAMS, backend_or_skip
from fused_cosloss import LinearMixedLoss, MixedLoss, linear_mixed_loss, mixed_loss
from helpers import (UNIT_FLOORS, assert_agrees, assert_close_rel, gradient_tolerance, make_inputs, objective_weights,
                     run_and_backprop, tolerance)
from spec_oracle import spec_loss

PARTS = ("loss", "ce", "cos", "z_loss")
OPTION_SETS = {  # "weight": a constant per-position weight, "weight-grad": one that is differentiated
    "scale": dict(logit_scale=0.5),
    "cap": dict(softcap=3.0),
    "scale-cap": dict(logit_scale=2.5, softcap=3.0),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing-1": dict(label_smoothing=1.0),
    "z-loss": dict(z_loss=0.05),
    "weight": dict(weight="constant"),
    "weight-grad": dict(weight="leaf"),
    "all": dict(logit_scale=1.7, softcap=4.0, label_smoothing=0.2, z_loss=0.02, weight="constant"),
}
SHAPES = {  # name: (N, V, H, K)
    "plain": (7, 37, 5, 4),
    "K1": (6, 23, 4, 1),
    "topk-None": (5, 29, 4, None),
}
KERNELS = [p for p in BACKEND_PARAMS if p.values[0][0] != "reference"]


def _weights(gen, n, device, zeros=True):
    """Per-position weights in [0, 2), a few of them exactly 0."""
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    if zeros:
        w[::3] = 0.0
    return w.to(device)


def _split(options, weight):
    """(options for the loss, tensors to differentiate) with the weight placed as the option set says."""
    options = dict(options)
    kind = options.pop("weight", None)
    if kind == "constant":
        return dict(options, weight=weight), {}
    if kind == "leaf":
        return options, {"weight": weight}
    return options, {}


def _package(backend, options, **more):
    def fn(logits, labels, embedding, **leaves):
        return mixed_loss(logits, labels, embedding, backend=backend, return_parts=True, **options, **leaves, **more)
    return fn


def _oracle(options):
    def fn(logits, labels, embedding, **leaves):
        extra = {k: (v.double() if torch.is_tensor(v) else v) for k, v in {**options, **leaves}.items()}
        return spec_loss(logits.double(), labels, embedding.double(), **extra)
    return fn


def _evaluate(fn, logits, labels, embedding, leaves, weights):
    return run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding, **leaves), weights=weights,
                            parts=PARTS)


def _case(gen, shape, dtype, device, option_set, reduction):
    n, vocab, hidden, topk = SHAPES[shape]
    logits, labels, embedding = make_inputs(gen, n, vocab, hidden, dtype=dtype, device=device, scale=3.0)
    options, leaves = _split(OPTION_SETS[option_set], _weights(gen, n, device).to(dtype))
    options = dict(options, alpha=0.4, temperature=0.8, topk=topk, reduction=reduction)
    return logits, labels, embedding, options, leaves, (*objective_weights(gen, reduction, n), 0.7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option_set", OPTION_SETS)
def test_reference_matches_the_definition(option_set, shape, reduction, gen):
    """The reference in float64 against the literal transcription, every part and gradient (the
    weight's too, where it is differentiated)."""
    logits, labels, embedding, options, leaves, weights = _case(gen, shape, torch.float64, "cpu", option_set, reduction)
    actual = _evaluate(_package("reference", options), logits, labels, embedding, leaves, weights)
    expected = _evaluate(_oracle(options), logits, labels, embedding, leaves, weights)
    assert_agrees(actual, expected, rel=1e-10, reduction=reduction, what=option_set)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_match_the_reference(backend, option_set, shape, reduction, dtype, gen):
    name, device = backend
    backend_or_skip(name, device, dtype)
    logits, labels, embedding, options, leaves, weights = _case(gen, shape, dtype, device, option_set, reduction)
    actual = _evaluate(_package(name, options), logits, labels, embedding, leaves, weights)
    expected = _evaluate(_package("reference", options), logits, labels, embedding, leaves, weights)
    assert_agrees(actual, expected, rel=tolerance(dtype), grad_rel=gradient_tolerance(dtype, 0.8),
                  reduction=reduction, what=f"{name} {option_set}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option_set", ["cap", "smoothing", "z-loss", "all"])
@pytest.mark.parametrize("backend", KERNELS)
def test_gradient_in_the_forward_matches(backend, option_set, reduction, gen):
    """grad_in_forward=True (the Triton kernel's fused pass, the z-loss's lse coefficient formed in it)
    against the gradient computed in the backward."""
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding, options, _, _ = _case(gen, "plain", torch.float32, device, option_set, reduction)

    def run(grad_in_forward):
        return run_and_backprop(_package(name, options, grad_in_forward=grad_in_forward),
                                dict(logits=logits, labels=labels, embedding=embedding), parts=("loss",))

    assert_agrees(run(True), run(False), rel=1e-5, reduction=reduction, floors=UNIT_FLOORS, what=option_set)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_alpha_zero_is_torch_cross_entropy_with_smoothing(backend, label_smoothing, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 9, 31, 4, device=device)
    z = logits.detach().clone().requires_grad_()
    loss = mixed_loss(z, labels, embedding, alpha=0.0, label_smoothing=label_smoothing, backend=name)
    loss.backward()
    z_ref = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(z_ref, labels, label_smoothing=label_smoothing, ignore_index=-100)
    expected.backward()
    assert_close_rel(loss, expected, 1e-5, "loss", floor=1.0)
    assert_close_rel(z.grad, z_ref.grad, 1e-5, "dlogits")


def _capped_and_zloss_closed_form(z, y, cap, zeta):
    """Liger-Kernel's semantics for its soft-cap and lse-square options, re-derived in float64 by
    hand: loss = mean_n (lse(z'_n) - z'_ny + zeta * lse(z'_n)^2) with z' = cap * tanh(z / cap), and
    d/dz = (softmax(z') (1 + 2 zeta lse) - onehot(y)) (1 - tanh^2(z / cap)) / N."""
    t = torch.tanh(z / cap)
    zc = cap * t
    lse = torch.logsumexp(zc, dim=-1)
    n = z.shape[0]
    loss = (lse - zc[torch.arange(n), y] + zeta * lse**2).mean()
    p = torch.softmax(zc, dim=-1)
    grad = p * (1 + 2 * zeta * lse)[:, None]
    grad[torch.arange(n), y] -= 1
    return loss, grad * (1 - t**2) / n


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_alpha_zero_cap_and_z_loss_match_the_closed_form(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 8, 27, 4, device=device, ignore_frac=0.0, scale=20.0)
    z = logits.detach().clone().requires_grad_()
    out = mixed_loss(z, labels, embedding, alpha=0.0, softcap=15.0, z_loss=1e-3, backend=name, return_parts=True,
                     grad_in_forward=False)
    out.loss.backward()
    loss, grad = _capped_and_zloss_closed_form(logits.double().cpu(), labels.cpu(), 15.0, 1e-3)
    assert_close_rel(out.loss, loss, 1e-5, "loss", floor=1.0)
    assert_close_rel(z.grad, grad, 1e-5, "dlogits")
    assert_close_rel(out.loss, out.ce + out.z_loss, 1e-6, "loss == ce + z_loss (alpha = 0)", floor=1.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_parts_add_up_with_every_option(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 10, 33, 6, device=device)
    weight = _weights(gen, 10, device).float()
    for reduction in ("mean", "sum", "none"):
        out = mixed_loss(logits, labels, embedding, alpha=0.3, topk=5, softcap=5.0, logit_scale=1.3, z_loss=0.01,
                         label_smoothing=0.1, weight=weight, reduction=reduction, backend=name, return_parts=True)
        assert_close_rel(out.loss, 0.3 * out.cos + 0.7 * out.ce + out.z_loss, 1e-6, reduction, floor=1.0)
        assert bool((out.z_loss.detach() >= 0).all())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ties_made_by_the_cap_take_the_lower_index(backend):
    """1000 and 1001 are both 30 after a cap of 30 in float32: the top-1 is then the lower index,
    which decides the expected embedding and the argmax."""
    name, device = backend
    backend_or_skip(name, device)
    vocab = 8
    logits = torch.zeros(2, vocab, device=device)
    logits[:, 2], logits[:, 5] = 1000.0, 1001.0
    labels = torch.tensor([2, 5], device=device)
    embedding = torch.eye(vocab, 4, device=device) + 0.1
    capped = mixed_loss(logits, labels, embedding, alpha=1.0, topk=1, softcap=30.0, backend=name, return_parts=True,
                        reduction="none")
    plain = mixed_loss(logits, labels, embedding, alpha=1.0, topk=1, backend=name, return_parts=True, reduction="none")
    e = embedding.double().cpu()
    cos = lambda i, j: float(F.cosine_similarity(e[i], e[j], dim=0))  # noqa: E731
    assert capped.cos.tolist() == pytest.approx([1 - cos(2, 2), 1 - cos(2, 5)], abs=1e-6)
    assert plain.cos.tolist() == pytest.approx([1 - cos(5, 2), 1 - cos(5, 5)], abs=1e-6)
    assert int(capped.n_correct) == 1 and int(plain.n_correct) == 1  # argmax: index 2 capped, 5 plain


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_minus_inf_under_a_cap_is_finite_with_zero_gradient(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 6, 20, 4, device=device, neg_inf_frac=0.5, ignore_frac=0.0)
    options = dict(alpha=0.5, topk=12, softcap=4.0, label_smoothing=0.1, z_loss=0.01, return_parts=True)
    actual = run_and_backprop(lambda **t: mixed_loss(**t, backend=name, **options),
                              dict(logits=logits, labels=labels, embedding=embedding), parts=PARTS)
    oracle = dict(options, temperature=1.0, reduction="mean")
    oracle.pop("return_parts")
    expected = run_and_backprop(_oracle(oracle), dict(logits=logits.double(), labels=labels, embedding=embedding.double()),
                                parts=PARTS)
    expected["dlogits"], expected["dembedding"] = expected.dlogits.float(), expected.dembedding.float()
    assert math.isfinite(float(actual.loss))
    assert bool((actual.dlogits[logits.isinf()] == 0).all())
    assert_agrees(actual, expected, rel=1e-5, floors=UNIT_FLOORS)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_smoothing_with_minus_inf_and_no_cap_is_infinite_like_torch(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 4, 12, 3, device=device, neg_inf_frac=0.3, ignore_frac=0.0)
    loss = mixed_loss(logits, labels, embedding, alpha=0.0, label_smoothing=0.1, backend=name)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert float(loss) == float(expected) == math.inf


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["every-position-ignored", "every-weight-zero"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nothing_to_weigh_gives_zero_not_nan(backend, case, reduction, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 5, 17, 4, device=device, ignore_frac=0.0)
    weight = torch.zeros(5, device=device)
    if case == "every-position-ignored":
        labels = torch.full_like(labels, -100)
        weight = torch.ones(5, device=device)
    options = dict(alpha=0.5, topk=4, softcap=3.0, z_loss=0.1, label_smoothing=0.1, weight=weight,
                   reduction=reduction)
    for grad_in_forward in (False, None):
        z, e = logits.clone().requires_grad_(), embedding.clone().requires_grad_()
        out = mixed_loss(z, labels, e, backend=name, grad_in_forward=grad_in_forward, **options)
        out.backward()
        assert float(out) == 0.0
        assert bool((z.grad == 0).all()) and bool((e.grad == 0).all())


def test_weight_shifts_with_the_labels(gen):
    logits, labels, embedding = make_inputs(gen, 12, 19, 4)
    logits, labels = logits.reshape(2, 6, 19), labels.reshape(2, 6)
    weight = _weights(gen, 12, "cpu").float().reshape(2, 6)
    shifted = mixed_loss(logits, labels, embedding, weight=weight, shift=True, topk=4, backend="reference")
    manual = mixed_loss(logits[:, :-1], labels[:, 1:], embedding, weight=weight[:, 1:], topk=4, backend="reference")
    assert_close_rel(shifted, manual, 1e-6, floor=1.0)


@pytest.mark.parametrize("backend", KERNELS)
def test_grad_in_forward_refuses_a_weight_that_requires_grad(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 4, 11, 3, device=device)
    weight = torch.rand(4, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="grad_in_forward.*weight"):
        mixed_loss(logits.requires_grad_(), labels, embedding, weight=weight, backend=name, grad_in_forward=True)
    loss = mixed_loss(logits, labels, embedding, weight=weight, backend=name)  # None: the backward computes it
    loss.backward()
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fused_linear_matches_logits(backend, reduction, gen):
    """linear_mixed_loss applies the options to the logits it computes, chunk by chunk."""
    name, device = backend
    backend_or_skip(name, device)
    n, vocab, hidden_size = 11, 29, 6
    hidden = torch.randn(n, hidden_size, generator=gen).to(device)
    head = torch.randn(vocab, hidden_size, generator=gen).to(device) * 2
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[1] = -100
    weight = _weights(gen, n, device).float()
    options = dict(alpha=0.4, topk=5, softcap=6.0, logit_scale=0.8, z_loss=0.01, label_smoothing=0.1,
                   reduction=reduction, return_parts=True, backend=name)
    tensors = dict(hidden=hidden, head=head, labels=labels)
    parts = PARTS if reduction == "none" else ("loss",)  # a reduced loss's parts are for reading only
    linear = run_and_backprop(
        lambda hidden, head, labels: linear_mixed_loss(hidden, head, labels, position_weight=weight, chunk_size=4,
                                                       **options), tensors, parts=parts)
    logits = run_and_backprop(
        lambda hidden, head, labels: mixed_loss(hidden @ head.T, labels, head, weight=weight, **options), tensors,
        parts=parts)
    assert_agrees(linear, logits, rel=2e-5, reduction=reduction, floors=UNIT_FLOORS)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_compile_fullgraph_with_options(backend, gen):
    name, device = backend
    backend_or_skip(name, device)
    torch._dynamo.reset()
    logits, labels, embedding = make_inputs(gen, 8, 20, 6, device=device)
    weight = _weights(gen, 8, device).float()

    def step(logits, labels, embedding):
        out = mixed_loss(logits, labels, embedding, alpha=0.5, topk=4, softcap=5.0, logit_scale=1.5, z_loss=0.01,
                         label_smoothing=0.1, weight=weight, backend=name, return_parts=True)
        return out.loss, out.ce, out.cos, out.n_valid, out.n_correct, out.cos_sim_sum, out.z_loss

    explanation = torch._dynamo.explain(step)(logits, labels, embedding)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    tensors = dict(logits=logits, labels=labels, embedding=embedding)
    assert_agrees(run_and_backprop(compiled, tensors, parts=PARTS), run_and_backprop(step, tensors, parts=PARTS),
                  rel=1e-5, floors=UNIT_FLOORS)
    torch._dynamo.reset()


def test_meta_tensors_with_options():
    logits = torch.empty(2, 5, 11, device="meta", requires_grad=True)
    labels = torch.empty(2, 5, dtype=torch.long, device="meta")
    embedding = torch.empty(11, 3, device="meta", requires_grad=True)
    weight = torch.empty(2, 5, device="meta")
    out = mixed_loss(logits, labels, embedding, softcap=3.0, z_loss=0.1, label_smoothing=0.1, weight=weight,
                     shift=True, return_parts=True)
    assert out.z_loss.shape == () and out.z_loss.is_meta
    out.loss.backward()
    assert logits.grad.shape == logits.shape and embedding.grad.shape == embedding.shape


def test_modules_take_the_options(gen):
    logits, labels, embedding = make_inputs(gen, 6, 15, 4)
    weight = _weights(gen, 6, "cpu").float()
    options = dict(softcap=4.0, logit_scale=0.5, label_smoothing=0.1, z_loss=0.01)
    module = MixedLoss(alpha=0.3, topk=4, backend="reference", **options)
    assert "softcap=4.0" in repr(module) and "z_loss=0.01" in repr(module)
    assert float(module(logits, labels, embedding, weight=weight)) == float(
        mixed_loss(logits, labels, embedding, alpha=0.3, topk=4, backend="reference", weight=weight, **options))
    hidden, head = torch.randn(6, 4, generator=gen), torch.randn(15, 4, generator=gen)
    linear = LinearMixedLoss(alpha=0.3, topk=4, backend="reference", **options)
    assert_close_rel(linear(hidden, head, labels, position_weight=weight),
                     mixed_loss(hidden @ head.T, labels, head, alpha=0.3, topk=4, backend="reference", weight=weight,
                                **options), 1e-6, floor=1.0)
    assert "softcap" not in repr(MixedLoss())


@pytest.mark.parametrize("options, error, match", [
    (dict(softcap=0.0), ValueError, "softcap: expected a finite value > 0"),
    (dict(softcap=-1), ValueError, "softcap"),
    (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(logit_scale=0), ValueError, "logit_scale: expected a finite value > 0"),
    (dict(logit_scale=math.nan), ValueError, "logit_scale"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected a value in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1e-4), ValueError, "z_loss: expected a finite value >= 0"),
    (dict(z_loss="1e-4"), TypeError, "z_loss"),
    (dict(weight=torch.ones(7)), ValueError, "weight: expected the labels' shape"),
    (dict(weight=torch.ones(4, dtype=torch.long)), TypeError, "weight: expected a floating dtype"),
    (dict(weight=[1.0, 1.0, 1.0, 1.0]), TypeError, "weight: expected None or a floating torch.Tensor"),
])
def test_bad_options_name_themselves(options, error, match, gen):
    logits, labels, embedding = make_inputs(gen, 4, 9, 3)
    with pytest.raises(error, match=match):
        mixed_loss(logits, labels, embedding, **options)


def test_numpy_and_tensor_scalars_are_accepted(gen):
    np = pytest.importorskip("numpy")
    logits, labels, embedding = make_inputs(gen, 4, 9, 3)
    expected = mixed_loss(logits, labels, embedding, softcap=3.0, z_loss=0.01, label_smoothing=0.1, logit_scale=2.0,
                          backend="reference")
    actual = mixed_loss(logits, labels, embedding, softcap=np.float32(3.0), z_loss=torch.tensor(0.01),
                        label_smoothing=np.float64(0.1), logit_scale=torch.tensor(2), backend="reference")
    assert_close_rel(actual, expected, 1e-6, floor=1.0)
