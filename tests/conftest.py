"""Test set-up: the session seed, a per-test generator, and the backend fixture.

Every test draws fresh random inputs from a seed chosen per session (printed in the
header; set FUSED_COSLOSS_TEST_SEED to reproduce a run). Backends that cannot run are
skipped with their reason, unless FUSED_COSLOSS_REQUIRE_BACKENDS names them (CI does),
in which case that is a failure.
"""
from __future__ import annotations

import contextlib
import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; the
# variable is read when triton is imported, so it is set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_cosloss.backends import why_unavailable  # noqa: E402

SEED = int(os.environ.get("FUSED_COSLOSS_TEST_SEED", random.SystemRandom().randrange(2**31)))
REQUIRED = {name for name in os.environ.get("FUSED_COSLOSS_REQUIRE_BACKENDS", "").split(",") if name}
BACKEND_PARAMS = [
    pytest.param(("reference", "cpu"), id="reference-cpu"),
    pytest.param(("native", "cpu"), id="native-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("reference", "cuda"), id="reference-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]


def pytest_report_header(config):
    return f"fused_cosloss: test seed {SEED} (FUSED_COSLOSS_TEST_SEED={SEED} reproduces it)"


@pytest.fixture
def gen(request):
    """A generator seeded from the session seed and the test's id."""
    return torch.Generator().manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)


def backend_or_skip(name: str, device: str, dtype=torch.float32, emb_dtype=None) -> None:
    """Skip (or fail, when required) if backend ``name`` cannot run on ``device`` with these dtypes."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits = torch.empty(1, 1, device=device, dtype=dtype)
    embedding = torch.empty(1, 1, device=device, dtype=emb_dtype or dtype)
    reason = why_unavailable(name, logits, embedding)
    if reason is None:
        return
    if name in REQUIRED and dtype == torch.float32:
        pytest.fail(f"backend {name!r} is required (FUSED_COSLOSS_REQUIRE_BACKENDS) but cannot run: {reason}")
    pytest.skip(f"{name} on {device}/{dtype}: {reason}")


@pytest.fixture(scope="session")
def hf():
    """transformers (with datasets and tokenizers), its logging quietened; skips without them."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("tokenizers")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """(backend name, device) for every backend, skipped where it cannot run."""
    name, device = request.param
    backend_or_skip(name, device)
    return name, device


@pytest.fixture
def ops():
    """The Triton backend's module (``fused_cosloss.triton_ops``), imported by the test that uses it."""
    import fused_cosloss.triton_ops as module

    return module


@pytest.fixture
def tune():
    """Sets tuning knobs of the Triton backend (``triton_ops.config.CONFIG``) for the rest of one
    test: ``tune(sparse_max_k=4)``."""
    from fused_cosloss.triton_ops.config import override

    with contextlib.ExitStack() as stack:
        yield lambda **knobs: stack.enter_context(override(**knobs))
