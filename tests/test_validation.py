"""Bad input gets a clear error naming the argument, before any kernel runs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_cosloss import LinearMixedLoss, MixedLoss, linear_mixed_loss, mixed_loss

V, H = 11, 4


def good():
    return torch.randn(2, 3, V), torch.randint(0, V, (2, 3)), torch.randn(V, H)


def call(logits=None, labels=None, embedding=None, **options):
    z, y, e = good()
    return mixed_loss(z if logits is None else logits, y if labels is None else labels,
                      e if embedding is None else embedding, **options)


BAD_TENSORS = {
    "integer logits": (dict(logits=torch.randint(0, 3, (2, 3, V))), TypeError, "logits"),
    "float labels": (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
    "bool labels": (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "labels"),
    "list logits": (dict(logits=[[0.0] * V]), TypeError, "logits"),
    "labels shape": (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    "label too large": (dict(labels=torch.full((2, 3), V)), ValueError, "labels"),
    "negative label": (dict(labels=torch.full((2, 3), -1)), ValueError, "labels"),
    "embedding 1-D": (dict(embedding=torch.randn(V)), ValueError, "embedding"),
    "embedding rows": (dict(embedding=torch.randn(V + 1, H)), ValueError, "embedding"),
    "integer embedding": (dict(embedding=torch.zeros(V, H, dtype=torch.long)), TypeError, "embedding"),
    "empty vocabulary": (dict(logits=torch.randn(2, 3, 0), embedding=torch.randn(0, H)), ValueError, "logits"),
    "shift on 2-D": (dict(logits=torch.randn(6, V), labels=torch.randint(0, V, (6,)), shift=True), ValueError, "shift"),
}
BAD_OPTIONS = {
    "alpha above 1": (dict(alpha=1.5), ValueError, "alpha"),
    "alpha below 0": (dict(alpha=-0.1), ValueError, "alpha"),
    "alpha NaN": (dict(alpha=float("nan")), ValueError, "alpha"),
    "alpha string": (dict(alpha="0.5"), TypeError, "alpha"),
    "temperature zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature negative": (dict(temperature=-1.0), ValueError, "temperature"),
    "temperature inf": (dict(temperature=math.inf), ValueError, "temperature"),
    "temperature NaN": (dict(temperature=math.nan), ValueError, "temperature"),
    "topk zero": (dict(topk=0), ValueError, "topk"),
    "topk float": (dict(topk=2.5), TypeError, "topk"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("kwargs, error, name", list({**BAD_TENSORS, **BAD_OPTIONS}.values()),
                         ids=list({**BAD_TENSORS, **BAD_OPTIONS}))
def test_bad_input_raises_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        call(**kwargs)


@pytest.mark.parametrize("kwargs, error, name", list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_module_rejects_bad_options_at_construction(kwargs, error, name):
    with pytest.raises(error, match=name):
        MixedLoss(**kwargs)


def test_shifted_labels_are_checked_too():
    z, y, e = good()
    y[:, 0] = V + 5  # position 0 is dropped by the shift, so this label is never used ...
    mixed_loss(z, y, e, shift=True)
    y[:, 1] = V + 5  # ... but position 1 is the first target after the shift
    with pytest.raises(ValueError, match="labels"):
        mixed_loss(z, y, e, shift=True)


def test_tensors_on_different_devices_raise():
    z, y, e = good()
    with pytest.raises(ValueError, match="device"):
        mixed_loss(z, y, e.to("meta"))


def test_named_backend_that_cannot_run_says_why():
    z, y, e = good()
    with pytest.raises(RuntimeError, match="triton"):
        mixed_loss(z.double(), y, e.double(), backend="triton")


def test_ignore_index_labels_are_allowed_anywhere():
    z, y, e = good()
    y[0, 0] = -100
    assert torch.isfinite(call(labels=y))


@settings(max_examples=30, deadline=None)
@given(alpha=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9)),
       temperature=st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(-math.inf)))
def test_out_of_range_scalars_always_raise(alpha, temperature):
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=alpha)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=temperature)


# ---- numbers of any kind, flags that are bools ---------------------------------------------------

def _numpy():
    return pytest.importorskip("numpy")


def _linear_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (2, 3), generator=g)


def test_numpy_and_tensor_scalars_equal_python_numbers():
    numpy = _numpy()
    z, y, e = good()
    plain = dict(alpha=0.5, temperature=0.75, topk=4, ignore_index=-100)
    kinds = [
        dict(alpha=numpy.float32(0.5), temperature=numpy.float64(0.75), topk=numpy.int64(4), ignore_index=numpy.int32(-100)),
        dict(alpha=torch.tensor(0.5), temperature=torch.tensor(0.75, dtype=torch.float64), topk=torch.tensor(4),
             ignore_index=torch.tensor(-100)),
    ]
    expected = mixed_loss(z, y, e, backend="reference", **plain)
    h, w, yl = _linear_inputs()
    expected_linear = linear_mixed_loss(h, w, yl, backend="reference", **plain)
    for options in kinds:
        assert torch.equal(mixed_loss(z, y, e, backend="reference", **options), expected)
        assert torch.equal(MixedLoss(backend="reference", **options)(z, y, e), expected)
        assert torch.equal(linear_mixed_loss(h, w, yl, backend="reference", chunk_size=numpy.int64(2), **options),
                           expected_linear)
        assert torch.equal(LinearMixedLoss(backend="reference", **options)(h, w, yl), expected_linear)
    module = MixedLoss(**kinds[0])
    assert type(module.alpha) is float and type(module.topk) is int and type(module.ignore_index) is int


def test_a_linspace_sweep_is_accepted():
    numpy = _numpy()
    z, y, e = good()
    # float32: numpy's float64 is a subclass of float, float32 is not
    for alpha in numpy.linspace(0.0, 1.0, 3, dtype=numpy.float32):
        for temperature in numpy.linspace(0.5, 1.5, 2, dtype=numpy.float32):
            expected = mixed_loss(z, y, e, alpha=float(alpha), temperature=float(temperature), backend="reference")
            assert torch.equal(mixed_loss(z, y, e, alpha=alpha, temperature=temperature, backend="reference"), expected)


def _refused_scalars():
    numpy = _numpy()
    return {
        "alpha bool": (dict(alpha=True), TypeError, "alpha"),
        "alpha numpy bool": (dict(alpha=numpy.bool_(True)), TypeError, "alpha"),
        "alpha numpy NaN": (dict(alpha=numpy.float64("nan")), ValueError, "alpha"),
        "alpha tensor 1-D": (dict(alpha=torch.tensor([0.5])), TypeError, "alpha"),
        "alpha tensor requires grad": (dict(alpha=torch.tensor(0.5, requires_grad=True)), TypeError, "alpha"),
        "alpha bool tensor": (dict(alpha=torch.tensor(True)), TypeError, "alpha"),
        "alpha meta tensor": (dict(alpha=torch.tensor(0.5, device="meta")), TypeError, "alpha"),
        "temperature tensor inf": (dict(temperature=torch.tensor(float("inf"))), ValueError, "temperature"),
        "temperature numpy inf": (dict(temperature=numpy.float32("inf")), ValueError, "temperature"),
        "topk numpy float": (dict(topk=numpy.float64(4.0)), TypeError, "topk"),
        "topk float tensor": (dict(topk=torch.tensor(4.0)), TypeError, "topk"),
        "topk bool": (dict(topk=True), TypeError, "topk"),
        "ignore_index float": (dict(ignore_index=-100.0), TypeError, "ignore_index"),
        "ignore_index bool": (dict(ignore_index=False), TypeError, "ignore_index"),
    }


@pytest.mark.parametrize("case", ["alpha bool", "alpha numpy bool", "alpha numpy NaN", "alpha tensor 1-D",
                                  "alpha tensor requires grad", "alpha bool tensor", "alpha meta tensor",
                                  "temperature tensor inf", "temperature numpy inf", "topk numpy float",
                                  "topk float tensor", "topk bool", "ignore_index float", "ignore_index bool"])
def test_bools_non_finite_and_odd_tensors_are_still_refused(case):
    kwargs, error, name = _refused_scalars()[case]
    z, y, e = good()
    h, w, yl = _linear_inputs()
    with pytest.raises(error, match=name):
        mixed_loss(z, y, e, **kwargs)
    with pytest.raises(error, match=name):
        linear_mixed_loss(h, w, yl, **kwargs)
    with pytest.raises(error, match=name):
        MixedLoss(**kwargs)
    with pytest.raises(error, match=name):
        LinearMixedLoss(**kwargs)


FLAG_VALUES = ["yes", 1, 0, None, torch.tensor(True)]


@pytest.mark.parametrize("value", FLAG_VALUES, ids=repr)
@pytest.mark.parametrize("flag", ["shift", "return_parts", "inplace_grad"])
def test_mixed_loss_flags_must_be_bools(flag, value):
    z, y, e = good()
    with pytest.raises(TypeError, match=rf"{flag}: expected True or False, got"):
        mixed_loss(z, y, e, **{flag: value})


@pytest.mark.parametrize("value", ["yes", 1, torch.tensor(True)], ids=repr)
def test_grad_in_forward_must_be_a_bool_or_none(value):
    z, y, e = good()
    with pytest.raises(TypeError, match="grad_in_forward: expected True, False or None"):
        mixed_loss(z, y, e, grad_in_forward=value)
    with pytest.raises(TypeError, match="grad_in_forward"):
        MixedLoss(grad_in_forward=value)


@pytest.mark.parametrize("value", FLAG_VALUES, ids=repr)
@pytest.mark.parametrize("flag", ["shift", "return_parts"])
def test_linear_mixed_loss_flags_must_be_bools(flag, value):
    h, w, y = _linear_inputs()
    with pytest.raises(TypeError, match=rf"{flag}: expected True or False"):
        linear_mixed_loss(h, w, y, **{flag: value})


@pytest.mark.parametrize("value", ["yes", 1, None], ids=repr)
def test_module_flags_must_be_bools(value):
    z, y, e = good()
    h, w, yl = _linear_inputs()
    for make in (MixedLoss, LinearMixedLoss):
        with pytest.raises(TypeError, match="shift: expected True or False"):
            make(shift=value)
    with pytest.raises(TypeError, match="inplace_grad: expected True or False"):
        MixedLoss(inplace_grad=value)
    with pytest.raises(TypeError, match="return_parts: expected True or False"):
        MixedLoss()(z, y, e, return_parts=value)
    with pytest.raises(TypeError, match="return_parts: expected True or False"):
        LinearMixedLoss()(h, w, yl, return_parts=value)


def test_chunk_size_takes_integers_of_any_kind_but_not_floats_or_bools():
    numpy = _numpy()
    h, w, y = _linear_inputs()
    expected = linear_mixed_loss(h, w, y, chunk_size=2, backend="reference")
    assert torch.equal(linear_mixed_loss(h, w, y, chunk_size=numpy.int64(2), backend="reference"), expected)
    assert LinearMixedLoss(chunk_size=torch.tensor(2)).chunk_size == 2
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="chunk_size"):
            linear_mixed_loss(h, w, y, chunk_size=bad)


def test_trainer_loss_takes_numbers_of_any_kind_and_refuses_non_bool_flags():
    numpy = _numpy()
    from fused_cosloss.hf import MixedLossForTrainer

    e = torch.randn(V, H)
    fn = MixedLossForTrainer(embedding=e, alpha=numpy.float32(0.5), temperature=torch.tensor(0.75),
                             topk=numpy.int64(4), ignore_index=numpy.int64(-100), alpha_warmup=numpy.float64(0.1),
                             chunk_size=numpy.int32(3))
    assert (fn.alpha, fn.temperature, fn.topk, fn.ignore_index, fn.alpha_warmup, fn.chunk_size) == (
        0.5, 0.75, 4, -100, 0.1, 3)
    assert all(type(v) in (float, int) for v in (fn.alpha, fn.temperature, fn.topk, fn.ignore_index))
    for flag in ("embedding_grad", "probe_grad_norms", "fused_linear"):
        with pytest.raises(TypeError, match=rf"{flag}: expected True or False"):
            MixedLossForTrainer(embedding=e, **{flag: "yes"})
    for bad, error in ((True, TypeError), (numpy.float64("nan"), ValueError), ("0.1", TypeError)):
        with pytest.raises(error, match="alpha_warmup"):
            MixedLossForTrainer(embedding=e, alpha_warmup=bad)
