"""Triton-specific tests: the paths and properties the backend-parametrised suite does not reach.

Under the interpreter (no GPU; tests/conftest.py sets TRITON_INTERPRET=1): the candidate-
overflow fallback of the top-k selection, the dense path for large k, blocks of rows
walked by the persistent row kernel, bitwise determinism of the embedding gradient.
On a GPU (``-m gpu``): the same against the reference on CUDA, determinism with long
segments, and N * V > 2**31 (64-bit offsets).
"""
from __future__ import annotations


import pytest
import torch

from conftest import backend_or_skip
from fused_cosloss import mixed_loss
from fused_cosloss.options import LossOptions
from helpers import (UNIT_FLOORS, assert_agrees, assert_close_rel, gradient_tolerance, make_inputs, run_and_backprop,
                     tolerance)


def _run(backend, logits, labels, embedding, **options):
    """Loss parts and both gradients of alpha * cos + (1 - alpha) * ce + 0.3 * ce + 0.7 * cos."""
    def fn(logits, labels, embedding):
        return mixed_loss(logits, labels, embedding, backend=backend, return_parts=True, **options)
    result = run_and_backprop(fn, dict(logits=logits, labels=labels, embedding=embedding), weights=(1.0, 0.3, 0.7))
    return result, result.dlogits, result.dembedding


def _agree(logits, labels, embedding, **options):
    """The triton backend against the reference: counts exactly, loss, parts and cos_sim_sum against
    max(|reference|, 1), both gradients relative to their largest entry."""
    dtype = logits.dtype if logits.dtype == embedding.dtype == torch.float32 else torch.bfloat16
    got, want = (_run(name, logits, labels, embedding, **options)[0] for name in ("triton", "reference"))
    assert_agrees(got, want, rel=tolerance(dtype), grad_rel=gradient_tolerance(dtype, options.get("temperature", 1.0)),
                  floors=UNIT_FLOORS)


@pytest.fixture
def interpret():
    backend_or_skip("triton", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("capacity", [4, 9], ids=["every-row", "some-rows"])
def test_candidate_overflow_falls_back_to_whole_row_select(interpret, tune, gen, dtype, ties, capacity):
    """Rows with more candidates than the scratch holds (always when it holds fewer than k)
    take the whole-row radix select; the others in the same block keep theirs."""
    tune(candidate_capacity=capacity)
    logits, labels, embedding = make_inputs(gen, 9, 70, 6, dtype=dtype, ties=ties)
    _agree(logits, labels, embedding, topk=7, temperature=0.7)


def test_candidate_overflow_with_masked_vocabulary(interpret, tune, gen):
    tune(candidate_capacity=16)
    logits, labels, embedding = make_inputs(gen, 8, 90, 5, neg_inf_frac=0.9)
    _agree(logits, labels, embedding, topk=12)


@pytest.mark.parametrize("topk", [9, None])
@pytest.mark.parametrize("ties", [False, True])
def test_dense_path_for_large_k(interpret, tune, gen, topk, ties):
    """k above CONFIG.sparse_max_k: S by threshold, the cosine term through matrix products."""
    tune(sparse_max_k=4, dense_block_elements=64)  # several blocks of rows
    logits, labels, embedding = make_inputs(gen, 7, 31, 5, ties=ties)
    _agree(logits, labels, embedding, topk=topk, temperature=1.5)


def test_dense_path_bfloat16_and_nan_row(interpret, tune, gen):
    tune(sparse_max_k=4)
    logits, labels, embedding = make_inputs(gen, 6, 29, 4, dtype=torch.bfloat16, ignore_frac=0.0)
    logits[2, 5] = float("nan")
    out, dlogits, _ = _run("triton", logits, labels, embedding, topk=10)
    per_row = mixed_loss(logits, labels, embedding, backend="triton", topk=10, reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[torch.arange(6) != 2]).all()
    assert torch.isnan(dlogits[2]).all() and torch.isfinite(dlogits[torch.arange(6) != 2]).all()


def test_dense_path_ignored_row_with_huge_embedding_adds_nothing(interpret, gen):
    """An ignored row contributes exactly nothing to dE, even where its unused cosine
    coefficients overflow (|E| ~ 1e15: 1 / (eps |e|) * e is inf, and 0 * inf would be NaN)."""
    logits = torch.randn(2, 1100, generator=gen)
    embedding = torch.randn(1100, 8, generator=gen, dtype=torch.float64).mul(1e15).float()
    labels = torch.tensor([-100, 3])
    _, dlogits, demb = _run("triton", logits, labels, embedding, topk=None)
    _, dlogits_ref, demb_ref = _run("reference", logits, labels, embedding, topk=None)
    assert torch.isfinite(demb).all() and torch.isfinite(dlogits).all()
    assert torch.equal(dlogits[0], torch.zeros_like(dlogits[0]))
    assert_close_rel(demb, demb_ref, gradient_tolerance(torch.float32, 1.0), "dembedding")
    assert_close_rel(dlogits, dlogits_ref, gradient_tolerance(torch.float32, 1.0), "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_rows_longer_than_a_block_of_lanes(interpret, tune, gen, dtype, ties):
    """Rows of several blocks of lanes, as V = 50257 is on a GPU (the interpreter tests' rows
    otherwise fit one block): the lane bound from per-lane maxima over many blocks, the
    candidates collected across blocks, and a backward that walks the row in blocks."""
    tune(sparse_row_lanes=16, row_lanes=32)
    logits, labels, embedding = make_inputs(gen, 7, 200, 5, dtype=dtype, ties=ties)
    _agree(logits, labels, embedding, topk=9, temperature=0.7)
    # cross-entropy alone (the row kernel's CE-only mode, no parts): loss and logits gradient
    results = []
    for name in ("triton", "reference"):
        z = logits.detach().clone().requires_grad_()
        loss = mixed_loss(z, labels, embedding, alpha=0.0, backend=name)
        loss.backward()
        results.append((loss, z.grad))
    rel = tolerance(torch.float32) if dtype == torch.float32 else 1e-2
    assert_close_rel(results[0][0], results[1][0], rel, "ce", floor=1.0)
    assert_close_rel(results[0][1], results[1][1], rel, "dlogits")


def test_many_row_blocks_in_the_persistent_loop(interpret, gen):
    """More rows than one program step takes: the row kernel loops over blocks of rows."""
    logits, labels, embedding = make_inputs(gen, 53, 45, 4)
    _agree(logits, labels, embedding, topk=6, temperature=0.05)


def test_signed_zeros_tie(interpret, gen):
    """-0.0 and +0.0 are equal values: the lower index wins between them."""
    logits = torch.full((3, 12), -1.0)
    logits[:, 3] = -0.0
    logits[:, 8] = 0.0
    logits[:, 10] = 2.0
    labels = torch.tensor([3, 8, 10])
    embedding = torch.randn(12, 5, generator=gen)
    _agree(logits, labels, embedding, topk=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_backward_in_hidden_chunks_and_row_pieces(interpret, tune, gen, dtype, ties):
    """The backward as at the benchmark shape: H in several chunks (the last one partial: s
    summed across chunks, the logits gradient on S written by the last), and S's entries
    grouped in several pieces of rows (the last one partial)."""
    tune(hidden_chunk=16, piece_entries=3 * 7)  # 3 rows per piece at k = 7
    logits, labels, embedding = make_inputs(gen, 11, 50, 40, dtype=dtype, ties=ties)
    _agree(logits, labels, embedding, topk=7, temperature=0.7)


def test_hidden_chunks_in_place_and_zero_cosine_weights(interpret, tune, gen):
    """Several chunks with the gradient written over the logits, rows whose cosine weight is 0
    (their S written by the dense loop) and a row with NaN (written whole, NaN)."""
    tune(hidden_chunk=16, piece_entries=2 * 6)
    logits, labels, embedding = make_inputs(gen, 9, 40, 36, ignore_frac=0.0)
    weights = torch.rand(9, generator=gen)
    weights[[1, 4]] = 0.0
    logits[6, 3] = float("nan")
    grads = []
    for backend, inplace in (("triton", True), ("reference", False)):
        z = logits.clone().requires_grad_(True)
        e = embedding.clone().requires_grad_(True)
        out = mixed_loss(z * 1.0 if inplace else z, labels, e, backend=backend, topk=6, reduction="none",
                         return_parts=True, inplace_grad=inplace)
        ((out.ce + 0.5) * torch.rand(9, generator=torch.Generator().manual_seed(1)) + out.cos * weights).sum().backward()
        grads.append((z.grad, e.grad))
    (dz, de), (dz_ref, de_ref) = grads
    finite = torch.arange(9) != 6
    assert torch.isnan(dz[6]).all()
    assert_close_rel(dz[finite], dz_ref[finite], gradient_tolerance(torch.float32, 1.0), "dlogits")
    rows_of_6 = torch.zeros(40, dtype=torch.bool)
    rows_of_6[logits[6].nan_to_num(nan=float("inf")).topk(6).indices] = True
    rows_of_6[labels[6]] = True
    assert torch.isnan(de[rows_of_6]).all()
    assert_close_rel(de[~rows_of_6], de_ref[~rows_of_6], gradient_tolerance(torch.float32, 1.0), "dembedding")


def test_vocabulary_above_32768_with_int16_indices(interpret, gen):
    """S's indices are stored in 16 bits up to V = 65536: indices past 32767 (negative as
    int16) must come back as themselves, through the forward and both gradients."""
    logits, labels, embedding = make_inputs(gen, 4, 40000, 8, ignore_frac=0.0)
    logits[:, 39990:] += 8.0  # S among the last indices, and some labels there
    labels[:2] = torch.tensor([39995, 35000])
    _agree(logits, labels, embedding, topk=5, temperature=0.7)


def test_vocabulary_above_65536_with_int32_indices(interpret, gen):
    """Past V = 65536 S's indices stay int32: indices above 65535 through both gradients."""
    logits, labels, embedding = make_inputs(gen, 3, 70000, 4, ignore_frac=0.0)
    logits[:, 69990:] += 8.0
    labels[:2] = torch.tensor([69995, 66000])
    _agree(logits, labels, embedding, topk=4, temperature=0.7)


@pytest.mark.parametrize("vocab", [13, 40000], ids=["small", "int16-wraps"])
def test_grouped_entries_are_sorted_by_vocabulary_row_then_row(tune, gen, vocab):
    """The host-side grouping of S's entries: each piece's segment of v lists the positions
    n * k + j with S_n[j] = v for the piece's rows whose S holds v, in row order; rows left
    out appear nowhere. S's indices are int16 up to V = 65536, read unsigned."""
    from fused_cosloss.triton_ops.grouping import grouped_entries
    from fused_cosloss.triton_ops.layout import index_dtype

    n, k = 10, 4
    choices = torch.tensor([0, 1, 5, 12, vocab - 1, vocab // 2 + 3, vocab // 3])
    s_idx = torch.stack([choices[torch.randperm(len(choices), generator=gen)[:k]] for _ in range(n)])
    s_idx = s_idx.to(index_dtype(vocab))
    assert s_idx.dtype == torch.int16 and (vocab < 32768 or (s_idx < 0).any())
    flat = s_idx.to(torch.int64).reshape(-1) % 65536
    used = torch.rand(n, generator=gen) < 0.7
    tune(piece_entries=3 * k)
    entries, offsets, pieces, piece_len = grouped_entries(s_idx, used, vocab)
    assert pieces == 4 and piece_len == 3 * k and offsets.shape == (4, vocab + 1)
    for piece in range(pieces):
        rows = range(3 * piece, min(n, 3 * piece + 3))
        for v in choices.tolist():
            segment = entries[piece * piece_len + offsets[piece, v]: piece * piece_len + offsets[piece, v + 1]]
            want = [r * k + j for r in rows if used[r] for j in range(k) if flat[r * k + j] == v]
            assert segment.tolist() == want
        assert offsets[piece, -1] == sum(k for r in rows if used[r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tiles_under_the_interpreter(interpret, tune, gen, dtype):
    """The GPU's launch configuration (one row per program step, one vocabulary row per
    program, 8-wide K blocks), which the other interpreter tests do not take, on a shape with
    several K blocks, H chunks and pieces, both paths of the gradient."""
    from fused_cosloss.triton_ops import tiles

    tune(interpreter_tiles=False, hidden_chunk=16, piece_entries=2 * 20)
    assert tiles.gather_tiles(5, 20, 40)["BR"] == 1 and tiles.vocab_tiles(16)["VB"] == 1
    logits, labels, embedding = make_inputs(gen, 5, 70, 40, dtype=dtype, ties=dtype == torch.bfloat16)
    _agree(logits, labels, embedding, topk=20, temperature=0.7)
    z = logits.clone().requires_grad_(True)
    mixed_loss(z, labels, embedding, backend="triton", topk=20, temperature=0.7).backward()
    z_ref = logits.clone().requires_grad_(True)
    mixed_loss(z_ref, labels, embedding, backend="reference", topk=20, temperature=0.7).backward()
    assert_close_rel(z.grad, z_ref.grad, gradient_tolerance(dtype if dtype == torch.float32 else torch.bfloat16, 0.7),
                     "dlogits (gradient in the forward)")


def test_embedding_gradient_is_bitwise_deterministic(interpret, gen):
    logits, labels, embedding = make_inputs(gen, 12, 20, 6, ignore_frac=0.1)
    first = _run("triton", logits, labels, embedding, topk=8)[2]
    second = _run("triton", logits, labels, embedding, topk=8)[2]
    assert torch.equal(first, second)


@pytest.mark.parametrize("n", [0, 5])
@pytest.mark.parametrize("with_cos,k", [(False, 3), (True, 3), (True, 30)], ids=["ce", "sparse", "dense"])
@pytest.mark.parametrize("vocab", [20, 70000], ids=["int16-indices", "int32-indices"])
def test_fake_forward_matches_the_real_one(interpret, ops, tune, n, with_cos, k, vocab):
    """The custom op's fake kernel gives the saved state's real shapes and dtypes (torch.compile
    relies on it), n = 0 included."""
    tune(sparse_max_k=8)
    logits = torch.randn(n, vocab, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,))
    embedding = torch.randn(vocab, 4)
    real = ops.forward_rows(logits, labels, embedding, LossOptions(1.0, k, -100, with_cos))
    fake = ops.fake_forward_rows(logits, labels, embedding, LossOptions(1.0, k, -100, with_cos))
    flat_real = [*real[:4], *real[4]]
    flat_fake = [*fake[:4], *fake[4]]
    assert [(t.shape, t.dtype) for t in flat_real] == [(t.shape, t.dtype) for t in flat_fake]


def test_unavailable_reason_names_the_problem(ops):
    reason = ops.unavailable_reason(torch.empty(1, 1, dtype=torch.float64), torch.empty(1, 1))
    assert reason is not None and "float64" in reason
    reason = ops.unavailable_reason(torch.empty(1, 1), torch.empty(1, 1, dtype=torch.int32))
    assert reason is not None and "embedding" in reason


def test_config_override_sets_restores_and_names_unknown_knobs(interpret, ops):
    """override() changes CONFIG for its block only (an error inside included), the backend reads
    the change at its next call, and a misspelt knob is an error rather than ignored."""
    from fused_cosloss.triton_ops.config import CONFIG, override

    logits, labels, embedding = torch.randn(3, 12), torch.tensor([1, 2, 3]), torch.randn(12, 5)
    options = LossOptions(1.0, 6, -100, True)
    default = CONFIG.sparse_max_k
    with override(sparse_max_k=5, piece_entries=7) as config:
        assert config is CONFIG and (CONFIG.sparse_max_k, CONFIG.piece_entries) == (5, 7)
        assert ops.forward_rows(logits, labels, embedding, options).saved.mu.shape == (3, 5)  # dense: k > 5
    assert CONFIG.sparse_max_k == default and CONFIG.piece_entries == 1 << 18
    assert ops.forward_rows(logits, labels, embedding, options).saved.mu.shape == (0, 5)  # sparse again
    with pytest.raises(ZeroDivisionError):
        with override(sparse_max_k=5):
            1 / 0
    assert CONFIG.sparse_max_k == default
    with pytest.raises(TypeError, match="sparse_max_kk"):
        with override(sparse_max_kk=5):
            pass


# ------------------------------------------------------------------------------------------------
# On a GPU


@pytest.fixture
def cuda():
    backend_or_skip("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 50257, 768, 256), (33, 1000, 64, 1024), (16, 262144, 32, 64)],
                         ids=["gpt2", "K1024", "V262144"])
def test_cuda_agrees_with_reference(cuda, gen, dtype, shape):
    n, vocab, hidden, topk = shape
    logits, labels, embedding = make_inputs(gen, n, vocab, hidden, dtype=dtype, device="cuda", scale=4.0)
    _agree(logits, labels, embedding, topk=topk, temperature=0.7)


@pytest.mark.gpu
def test_cuda_ties_and_masked_vocabulary(cuda, gen):
    logits, labels, embedding = make_inputs(gen, 40, 5000, 32, ties=True, device="cuda")
    _agree(logits, labels, embedding, topk=256)
    logits, labels, embedding = make_inputs(gen, 40, 5000, 32, neg_inf_frac=0.98, device="cuda")
    _agree(logits, labels, embedding, topk=256)


@pytest.mark.gpu
def test_cuda_embedding_gradient_is_bitwise_deterministic(cuda, gen):
    """Long segments (a small vocabulary shared by many rows): same inputs, same bits."""
    logits, labels, embedding = make_inputs(gen, 4096, 2000, 256, dtype=torch.bfloat16, device="cuda")
    first = _run("triton", logits, labels, embedding, topk=256)
    second = _run("triton", logits, labels, embedding, topk=256)
    assert torch.equal(first[2], second[2])
    assert torch.equal(first[1], second[1])
    assert torch.equal(first[0].loss, second[0].loss)


@pytest.mark.gpu
def test_cuda_more_than_2_pow_31_logits(cuda, gen):
    """N * V > 2**31 elements (64-bit offsets): rows near the end agree with the reference."""
    n, vocab, hidden = 65536, 50257, 64
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * vocab * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a 6.6 GB logits tensor and its gradient")
    logits = torch.empty(n, vocab, device="cuda", dtype=torch.bfloat16)
    for start in range(0, n, 4096):
        logits[start:start + 4096].normal_(0.0, 3.0, generator=None)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    embedding = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    logits.requires_grad_(True)
    rows = mixed_loss(logits, labels, embedding, backend="triton", reduction="none", topk=64)
    rows[-8:].sum().backward()
    tail = slice(n - 8, n)
    want = mixed_loss(logits.detach()[tail], labels[tail], embedding, backend="reference", reduction="none", topk=64)
    assert_close_rel(rows.detach()[tail], want, 1e-2, "loss rows", floor=1.0)
    ref_logits = logits.detach()[tail].clone().requires_grad_(True)
    mixed_loss(ref_logits, labels[tail], embedding, backend="reference", reduction="none", topk=64).sum().backward()
    assert_close_rel(logits.grad[tail], ref_logits.grad, 1e-2, "dlogits rows")
    assert torch.count_nonzero(logits.grad[: n - 8]) == 0
