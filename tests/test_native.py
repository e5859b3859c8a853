"""Tests specific to the native CPU backend (csrc/, fused_cosloss/native.py).

The backend-parametrised suite (test_agreement.py, test_edge_cases.py, ...) checks the
native kernel against the reference on small vocabularies. Here: vocabularies large
enough for the kernel's block-bounded top-k selection to be used, exact top-k sets and
the tie rule, determinism (two runs, one thread against several), the build-failure
behaviour, bfloat16, strided logits and non-finite logits.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss import backends, mixed_loss
from fused_cosloss.options import LossOptions
from fused_cosloss.reference import select_topk
from helpers import (RELATIVE_FLOOR, assert_agrees, assert_close_rel, gradient_tolerance, make_inputs,
                     run_and_backprop, tolerance)


@pytest.fixture
def native():
    """The fused_cosloss.native module, skipped (or failed when required) where it cannot run."""
    backend_or_skip("native", "cpu")
    from fused_cosloss import native as module

    return module


def run(backend, logits, labels, embedding, weights=(1.0, 0.5, 0.25), **options):
    """Outputs and the gradients of w0 * loss + w1 * ce + w2 * cos (``run_and_backprop``), on fresh leaf copies."""
    def fn(logits, labels, embedding):
        return mixed_loss(logits, labels, embedding, backend=backend, return_parts=True, **options)
    return run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding), weights=weights)


def assert_matches(actual, expected, rel, grad_rel=None):
    """Counts exactly; loss, ce and the gradients relative to their largest entry; a cosine distance
    is O(1) however close to 0 it is (floor 1), a sum of N_valid cosines O(N_valid)."""
    assert_agrees(actual, expected, rel=rel, grad_rel=grad_rel,
                  floors={"loss": RELATIVE_FLOOR, "ce": RELATIVE_FLOOR, "cos": 1.0, "grad": RELATIVE_FLOOR})


def assert_identical(a, b):
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between runs"


# --------------------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("vocab, k", [(1000, 1), (1000, 7), (5003, 64), (5003, 256), (2049, 700), (50257, 256)])
@pytest.mark.parametrize("kind", ["normal", "ties", "-inf", "sorted", "constant"])
def test_selected_set_is_the_reference_top_k(native, vocab, k, kind, gen):
    """The saved top-k indices equal the reference's set, tie rule included (lower index wins)."""
    n = 6
    if kind == "ties":
        logits = torch.randint(-3, 4, (n, vocab), generator=gen).float()
    elif kind == "sorted":  # the worst case for the block bound: the k largest in the last blocks
        logits = torch.linspace(-5, 5, vocab).repeat(n, 1)
        logits[1::2] = logits[1::2].flip(-1)
    elif kind == "constant":
        logits = torch.full((n, vocab), 0.25)
    else:
        logits = torch.randn(n, vocab, generator=gen) * 3
    if kind == "-inf":  # fewer finite entries than k in some rows
        keep = torch.rand(n, vocab, generator=gen) < torch.tensor([0.5, 0.01, 0.001, 0.2, 1e-4, 0.9])[:, None]
        logits = logits.masked_fill(~keep, float("-inf"))
        logits[:, 0] = 1.0
    labels = torch.randint(0, vocab, (n,), generator=gen)
    embedding = torch.randn(vocab, 8, generator=gen)
    saved = native.forward_rows(logits, labels, embedding, LossOptions(1.0, k, -100, True)).saved
    idx = saved[1].long()
    expected = select_topk(logits, k).sort(dim=-1).values
    assert torch.equal(idx.sort(dim=-1).values, expected)
    assert torch.equal(idx, idx.sort(dim=-1).values), "S is kept in vocabulary order"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", [{}, {"ties": True}, {"neg_inf_frac": 0.97}, {"scale": 30.0}],
                         ids=["plain", "ties", "-inf", "wide"])
@pytest.mark.parametrize("k", [1, 37, 256])
def test_large_vocabulary_matches_reference(native, dtype, extra, k, gen):
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 8, 4001, 24, dtype=dtype, **extra)
    for temperature in (0.05, 1.0, 10.0):
        options = dict(alpha=0.5, temperature=temperature, topk=k, reduction="sum")
        assert_matches(run("native", logits, labels, embedding, **options),
                       run("reference", logits, labels, embedding, **options), tolerance(dtype),
                       gradient_tolerance(dtype, temperature))


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bfloat16_inputs_match_reference(native, dtype, emb_dtype, gen):
    backend_or_skip("native", "cpu", dtype, emb_dtype)
    logits, labels, embedding = make_inputs(gen, 16, 3001, 40, dtype=dtype, emb_dtype=emb_dtype)
    options = dict(alpha=0.3, temperature=0.7, topk=50, reduction="mean")
    actual = run("native", logits, labels, embedding, **options)
    assert actual["dlogits"].dtype == dtype and actual["dembedding"].dtype == emb_dtype
    assert_matches(actual, run("reference", logits, labels, embedding, **options), 1e-2)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_give_bitwise_identical_results(native, dtype, gen):
    backend_or_skip("native", "cpu", dtype)
    logits, labels, embedding = make_inputs(gen, 48, 4099, 64, dtype=dtype, ties=True)
    options = dict(alpha=0.5, temperature=0.7, topk=100, reduction="mean")
    assert_identical(run("native", logits, labels, embedding, **options),
                     run("native", logits, labels, embedding, **options))


def test_one_thread_and_several_threads_give_bitwise_identical_results(native, gen):
    """Rows are independent and the embedding gradient is summed in a fixed (CSR) order."""
    logits, labels, embedding = make_inputs(gen, 64, 3001, 32)
    labels[1::2] = labels[0::2]  # shared targets: several rows add into one embedding row
    options = dict(alpha=0.6, temperature=1.5, topk=64, reduction="sum")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.extension().threads_seen() == 1
        single = run("native", logits, labels, embedding, **options)
        torch.set_num_threads(max(2, before))
        several = run("native", logits, labels, embedding, **options)
    finally:
        torch.set_num_threads(before)
    assert_identical(single, several)


def test_parallel_for_uses_torch_threads(native):
    """The extension runs on torch's OpenMP pool (not a second one of its own)."""
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, 2, before}):
            torch.set_num_threads(threads)
            assert native.extension().threads_seen() == threads
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- layouts and values


def test_strided_logits_rows(native, gen):
    """Logits whose rows are longer than V in memory (unit stride along V) are read in place."""
    logits, labels, embedding = make_inputs(gen, 10, 1001, 16)
    wide = torch.randn(10, 1030, generator=gen)
    wide[:, 7:1008] = logits
    view = wide[:, 7:1008]
    assert view.stride() == (1030, 1)
    options = dict(alpha=0.5, temperature=1.0, topk=20, reduction="sum")
    assert_identical(run("native", view, labels, embedding, **options),
                     run("native", logits, labels, embedding, **options))


def test_without_cosine_term_equals_cross_entropy(native, gen):
    logits, labels, embedding = make_inputs(gen, 20, 2003, 8)
    z = logits.clone().requires_grad_()
    e = embedding.clone().requires_grad_()
    loss = mixed_loss(z, labels, e, alpha=0.0, topk=16, backend="native")
    loss.backward()
    z_ref = logits.clone().requires_grad_()
    expected = F.cross_entropy(z_ref, labels, ignore_index=-100)
    expected.backward()
    assert_close_rel(loss, expected, 1e-6, "loss")
    assert_close_rel(z.grad, z_ref.grad, 1e-5, "dlogits")
    assert e.grad is None, "the embedding is not used without the cosine term"


def test_nan_rows_give_nan_and_leave_other_rows_alone(native, gen):
    logits, labels, embedding = make_inputs(gen, 6, 5003, 16, ignore_frac=0.0)
    poisoned = logits.clone()
    poisoned[1, 17] = float("nan")
    poisoned[3] = float("nan")
    poisoned[4, ::2] = float("nan")
    options = dict(alpha=0.5, temperature=1.0, topk=64, reduction="none")
    clean = run("native", logits, labels, embedding, **options)
    dirty = run("native", poisoned, labels, embedding, **options)
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.isnan(dirty["loss"][bad]).all() and torch.isnan(dirty["ce"][bad]).all()
    assert torch.isnan(dirty["dlogits"][bad]).all()
    assert_close_rel(dirty["loss"][~bad], clean["loss"][~bad], 1e-6, "clean rows")
    assert torch.equal(dirty["dlogits"][~bad], clean["dlogits"][~bad])


def test_infinite_logits_follow_the_reference(native, gen):
    logits, labels, embedding = make_inputs(gen, 5, 3001, 8, ignore_frac=0.0)
    logits[0, 5] = float("inf")
    logits[1] = float("-inf")
    logits[2, :] = float("-inf")
    logits[2, labels[2]] = 0.0
    options = dict(alpha=0.0, temperature=1.0, topk=10, reduction="none")
    actual = mixed_loss(logits, labels, embedding, backend="native", **options)
    expected = mixed_loss(logits, labels, embedding, backend="reference", **options)
    assert_close_rel(actual, expected, 1e-6, "loss with inf logits")


def test_zero_coefficients_give_finite_gradients(native, gen):
    """alpha = 1 (zero CE coefficients) and alpha = 0 with the parts computed (zero cosine
    coefficients), on logits that are mostly -inf, with fewer finite entries than k in a row."""
    logits, labels, embedding = make_inputs(gen, 8, 2001, 8, neg_inf_frac=0.9)
    logits[0, :] = float("-inf")
    logits[0, labels[0].clamp_min(0)] = 1.0
    for alpha in (0.0, 1.0):
        options = dict(alpha=alpha, topk=32, reduction="mean", weights=(1.0, 0.0, 0.0))
        out = run("native", logits, labels, embedding, **options)
        ref = run("reference", logits, labels, embedding, **options)
        assert torch.isfinite(out["dlogits"]).all() and torch.isfinite(out["dembedding"]).all()
        assert_matches(out, ref, 1e-5)
        if alpha == 0.0:
            assert torch.all(out["dembedding"] == 0)


def test_capability_matches_the_loader(native):
    assert native.extension().capability() == native.isa()


# --------------------------------------------------------------------------- build failure


@pytest.fixture
def broken_build(tmp_path, monkeypatch):
    """Point the loader at sources that do not compile, then restore the real build."""
    from fused_cosloss import native

    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("#error fused_cosloss_test_marker: this source does not compile\n")
    monkeypatch.setenv("FUSED_COSLOSS_CSRC", str(src))
    monkeypatch.setenv("FUSED_COSLOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_COSLOSS_DISABLE_NATIVE", raising=False)
    native._reset()
    yield native
    monkeypatch.undo()
    native._reset()


def test_build_failure_native_raises_with_compiler_message(broken_build, gen):
    logits, labels, embedding = make_inputs(gen, 4, 31, 4)
    with pytest.raises(RuntimeError, match="fused_cosloss_test_marker"):
        mixed_loss(logits, labels, embedding, topk=5, backend="native")
    assert "fused_cosloss_test_marker" in backends.why_unavailable("native", logits, embedding)


def test_build_failure_auto_warns_once_and_uses_reference(broken_build, gen):
    logits, labels, embedding = make_inputs(gen, 4, 31, 4)
    expected = mixed_loss(logits, labels, embedding, topk=5, backend="reference")
    with pytest.warns(RuntimeWarning, match="fused_cosloss_test_marker"):
        first = mixed_loss(logits, labels, embedding, topk=5, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = mixed_loss(logits, labels, embedding, topk=5, backend="auto")
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_unsupported_dtypes_have_a_reason_and_auto_falls_back(native, gen):
    logits, labels, embedding = make_inputs(gen, 4, 31, 4, dtype=torch.float64)
    reason = backends.why_unavailable("native", logits, embedding)
    assert reason is not None and "float64" in reason
    with pytest.raises(RuntimeError, match="float64"):
        mixed_loss(logits, labels, embedding, topk=5, backend="native")
    half = logits.half()
    assert "float16" in backends.why_unavailable("native", half, embedding.half())


# --------------------------------------------------------------------------- other instruction sets


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FUSED_COSLOSS_TEST_ISAS"), reason="builds the extension again per ISA "
                    "(about a minute each); set FUSED_COSLOSS_TEST_ISAS=1 to run")
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2"])
def test_lower_instruction_set_builds_agree(native, isa, tmp_path, monkeypatch, gen):
    order = ["DEFAULT", "AVX2", "AVX512"]
    best = native.isa()
    if best not in order or order.index(isa) > order.index(best):
        pytest.skip(f"this CPU runs {best}")
    logits, labels, embedding = make_inputs(gen, 16, 5003, 24, ties=True)
    options = dict(alpha=0.5, temperature=0.7, topk=64, reduction="sum")
    expected = run("reference", logits, labels, embedding, **options)
    monkeypatch.setenv("FUSED_COSLOSS_NATIVE_ISA", isa)
    native._reset()
    try:
        assert native.extension().capability() == isa
        assert_matches(run("native", logits, labels, embedding, **options), expected, 1e-5)
    finally:
        monkeypatch.undo()
        native._reset()


# ---- the gradient-buffer cache (csrc/output_pool.h) ----------------------------------------------

def _gradients(logits, labels, embedding):
    z = logits.detach().clone().requires_grad_()
    e = embedding.detach().clone().requires_grad_()
    mixed_loss(z, labels, e, topk=8, backend="native").backward()
    return z.grad, e.grad


def test_freed_gradients_are_reused_and_live_ones_never(native, gen):
    """Gradients of 4 MiB or more: a freed one's buffer serves the next call of its size, a
    live one's never does, and the values are those of a fresh computation."""
    native.empty_cache()
    logits, labels, embedding = make_inputs(gen, 64, 20000, 64)  # dlogits 5.1 MB, dE 5.1 MB
    first, first_e = _gradients(logits, labels, embedding)
    kept, kept_ptrs = first.clone(), {first.data_ptr(), first_e.data_ptr()}
    second, second_e = _gradients(logits, labels, embedding)  # the first ones are alive: new buffers
    assert not {second.data_ptr(), second_e.data_ptr()} & kept_ptrs
    assert torch.equal(first, kept) and torch.equal(second, kept)
    del first, first_e
    assert native.cached_bytes() >= 2 * 64 * 20000 * 4
    third, third_e = _gradients(logits, labels.flip(0), embedding)  # other labels, reused buffers
    assert {third.data_ptr(), third_e.data_ptr()} == kept_ptrs
    expected = run("reference", logits, labels.flip(0), embedding, weights=(1.0, 0.0, 0.0), topk=8)
    assert_close_rel(third, expected["dlogits"], tolerance(torch.float32), "dlogits")
    assert_close_rel(third_e, expected["dembedding"], tolerance(torch.float32), "dembedding")
    del second, second_e, third, third_e
    assert native.empty_cache() >= 4 * 64 * 20000 * 4 and native.cached_bytes() == 0


def test_cache_off_with_zero_megabytes(native, gen):
    """FUSED_COSLOSS_NATIVE_POOL_MB=0 (read at load): nothing is kept."""
    import subprocess
    import sys

    code = ("import torch; from fused_cosloss import mixed_loss, native\n"
            "z = torch.randn(64, 20000, requires_grad=True); e = torch.randn(20000, 64, requires_grad=True)\n"
            "mixed_loss(z, torch.randint(0, 20000, (64,)), e, topk=8, backend='native').backward()\n"
            "z.grad = e.grad = None\n"
            "print(native.cached_bytes())\n")
    env = dict(os.environ, FUSED_COSLOSS_NATIVE_POOL_MB="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0"


def test_old_builds_are_pruned_but_recent_and_unfinished_ones_kept(tmp_path):
    """Beyond the KEEP_BUILDS newest finished builds, those a week old or more are removed;
    newer ones and builds still in progress (no BUILD_OK) stay."""
    import time

    from fused_cosloss import native

    now = time.time()
    ages_days = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 3.5]  # 12 finished builds
    for i, age in enumerate(ages_days):
        build = tmp_path / f"native-avx2-{i:02d}"
        build.mkdir()
        (build / "BUILD_OK").write_text("x")
        os.utime(build / "BUILD_OK", (now - age * 86400, now - age * 86400))
    (tmp_path / "native-avx2-inprogress").mkdir()
    native._prune_old_builds(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    # the 8 newest are ages 0..6 and 3.5; of the rest (7, 8, 10, 12 days) all are a week old or more
    assert left == sorted([f"native-avx2-{i:02d}" for i in (0, 1, 2, 3, 4, 5, 6, 11)] + ["native-avx2-inprogress"])


# ---- Ctrl-C ----------------------------------------------------------------------------------------

_INTERRUPTED_CALLS = r"""
import math, sys, time
import torch
from fused_cosloss import native
from fused_cosloss.options import LossOptions

seconds = float(sys.argv[1])
V, H = 1024, 8192  # the whole vocabulary in S: every row gathers V rows of 8192 floats, twice
E = torch.randn(V, H)


def call(phase, n):
    z, y = torch.randn(n, V), torch.randint(0, V, (n,))
    if phase == "forward":
        return lambda: native.forward_rows(z, y, E, LossOptions(1.0, V, -100, True))
    # a made-up saved state of the right layout: only the backward's cost matters here
    saved = (torch.zeros(n, 3), torch.arange(V, dtype=torch.int32).repeat(n, 1), torch.full((n, V), 1.0 / V),
             torch.zeros(n, V), torch.randn(n, 2, H))
    g = torch.full((n,), 0.5)
    return lambda: native.backward_rows(z, y, E, saved, g, g, LossOptions(1.0, V, -100, True),
                                        need_logits_grad=True, need_embedding_grad=True)


for phase in ("forward", "backward"):
    small = 2 * torch.get_num_threads()
    call(phase, small)()
    start = time.monotonic()
    call(phase, small)()
    per_row = (time.monotonic() - start) / small
    n = min(max(small, math.ceil(seconds / per_row)), 2000)
    run = call(phase, n)
    print(f"calling {phase} {n * per_row:.3f}", flush=True)
    try:
        run()
        print(f"returned {time.monotonic():.6f}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic():.6f}", flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a child process")
def test_ctrl_c_interrupts_a_long_call(native):
    """SIGINT during a native forward, then a native backward, of several seconds each raises
    KeyboardInterrupt from the call within a fraction of a second (the kernel lets Python handle
    signals between blocks of rows), instead of after the call returns."""
    import signal
    import subprocess
    import sys
    import time

    expected_s, bound_s = 4.0, 1.0
    child = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_CALLS, str(expected_s)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for phase in ("forward", "backward"):
            line = child.stdout.readline()
            assert line.startswith(f"calling {phase}"), line + child.stderr.read()
            estimate = float(line.split()[2])
            if estimate < 3 * bound_s:
                pytest.skip(f"this machine runs the largest {phase} in {estimate:.1f} s: too fast to tell")
            time.sleep(0.5)
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            outcome, when = child.stdout.readline().split()
            assert outcome == "interrupted", f"the {phase} of ~{estimate:.1f} s ran to its end"
            assert float(when) - sent < bound_s, (
                f"{phase}: KeyboardInterrupt {float(when) - sent:.2f} s after SIGINT (bound {bound_s} s) in a call of "
                f"~{estimate:.1f} s")
        child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
