"""Bad input gets a clear error naming the argument, before any kernel runs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_cosloss import MixedLoss, mixed_loss

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
