"""The Triton backend's loss options (docs/spec.md, "Loss options") against the float64 oracle.

The backend protocol's functions (``forward_rows``, ``backward_rows``, ``forward_backward_rows``)
are called directly, under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), and held
to ``spec_oracle.spec_rows`` in float64: ce, cos, argmax == label and lse per position, and the
gradients of ``sum_n grad_ce[n] ce_n + grad_cos[n] cos_n + grad_lse[n] lse_n`` (random per-row
coefficients, zero at ignored rows) by autograd. Each option alone and together, on every path
of the kernels: K = 1, K < V, K >= V, the dense path, cross-entropy alone, the selection's
whole-row fallback, rows of several blocks of lanes and the GPU's tiles.
"""
from __future__ import annotations


import pytest
import torch

from conftest import backend_or_skip
from fused_cosloss.options import LossOptions
from helpers import assert_close_rel, gradient_tolerance, make_inputs, tolerance
from spec_oracle import spec_rows

IGNORE = -100
TEMPERATURE = 0.7
VOCAB = 40

OPTION_SETS = {
    "scale0.5": dict(logit_scale=0.5),
    "scale2": dict(logit_scale=2.0),
    "cap30": dict(softcap=30.0),
    "cap2": dict(softcap=2.0),
    "smooth0.1": dict(label_smoothing=0.1),
    "smooth1": dict(label_smoothing=1.0),
    "scale2+cap2+smooth0.1": dict(logit_scale=2.0, softcap=2.0, label_smoothing=0.1),
    "scale0.5+cap30+smooth1": dict(logit_scale=0.5, softcap=30.0, label_smoothing=1.0),
}
ALL_ON = OPTION_SETS["scale2+cap2+smooth0.1"]

# (topk, tuning knobs): the paths of the kernels
PATHS = {
    "K=1": (1, {}),
    "K<V": (5, {}),
    "K>=V": (VOCAB + 3, {}),
    "dense": (9, dict(sparse_max_k=4, dense_block_elements=64)),  # S by threshold, several blocks of rows
    "dense-whole-row": (None, dict(sparse_max_k=4)),
    "ce-only": ("ce-only", {}),
}


@pytest.fixture(autouse=True)
def interpret():
    backend_or_skip("triton", "cpu")


def _loss_options(topk, vocab, *, temperature=TEMPERATURE, **option_kw) -> LossOptions:
    with_cos = topk != "ce-only"
    return LossOptions.resolve(temperature=temperature, topk=None if not with_cos else topk, vocab=vocab,
                               ignore_index=IGNORE, with_cos=with_cos, **option_kw)


def _coefficients(gen, labels):
    """Random per-row grad_ce, grad_cos (signed) and grad_lse (signed), zero at ignored rows."""
    n = labels.shape[0]
    valid = (labels != IGNORE).float()
    grad_ce = (torch.rand(n, generator=gen) + 0.5) * valid
    grad_cos = (torch.rand(n, generator=gen) - 0.5) * valid
    grad_lse = (torch.rand(n, generator=gen) - 0.5) * valid
    return grad_ce, grad_cos, grad_lse


def _oracle(logits, labels, embedding, options: LossOptions, grad_ce, grad_cos, *, grad_lse=None,
            grad_lse_square=None):
    """(ce, cos, correct, lse, dlogits, dembedding) in float64: spec_rows, and autograd of
    sum grad_ce ce + grad_cos cos + grad_lse lse + grad_lse_square lse ** 2 (the cosine terms only
    with ``options.with_cos``; dembedding None without)."""
    z = logits.detach().double().requires_grad_()
    table = embedding.detach().double().requires_grad_()
    ce, _, cos, correct, valid, lse = spec_rows(
        z, labels, table, options.temperature, options.k, options.ignore_index,
        logit_scale=options.logit_scale, softcap=options.softcap, label_smoothing=options.label_smoothing,
        with_lse=True)
    if not options.with_cos:
        cos = torch.zeros_like(cos)
    objective = (grad_ce.double() * ce).sum() + (grad_cos.double() * cos).sum()
    if grad_lse is not None:
        objective = objective + (grad_lse.double() * lse).sum()
    if grad_lse_square is not None:
        objective = objective + (grad_lse_square.double() * lse ** 2).sum()
    if objective.requires_grad:
        objective.backward()
    dz = z.grad if z.grad is not None else torch.zeros_like(z)
    de = table.grad if table.grad is not None else torch.zeros_like(table)
    return (ce.detach(), cos.detach(), torch.tensor(correct, dtype=torch.bool), lse.detach(), dz,
            de if options.with_cos else None)


def _assert_rows_agree(got, want, dtype, what=""):
    """ce, cos, lse against max(|expected|, 1) to the dtype's tolerance; argmax == label exactly."""
    ce, cos, correct, lse = got
    want_ce, want_cos, want_correct, want_lse = want
    rel = tolerance(dtype)
    assert_close_rel(ce, want_ce, rel, f"{what}ce", floor=1.0)
    assert_close_rel(cos, want_cos, rel, f"{what}cos", floor=1.0)
    assert_close_rel(lse, want_lse, rel, f"{what}lse", floor=1.0)
    assert torch.equal(correct, want_correct), f"{what}correct: {correct.tolist()} != {want_correct.tolist()}"
    assert ce.dtype == cos.dtype == lse.dtype == torch.float32 and correct.dtype == torch.bool


def _assert_gradients_agree(dlogits, demb, want_dlogits, want_demb, logits, embedding, temperature=TEMPERATURE,
                            floor=1e-30):
    """Both gradients in the inputs' dtypes, relative to their largest entry (tests/test_triton.py's tolerance),
    or to ``floor`` where that is larger."""
    dtype = torch.float32 if logits.dtype == embedding.dtype == torch.float32 else torch.bfloat16
    rel = gradient_tolerance(dtype, temperature)
    assert dlogits.dtype == logits.dtype
    assert_close_rel(dlogits, want_dlogits, rel, "dlogits", floor=floor)
    if want_demb is None:
        assert demb is None
    else:
        assert demb.dtype == embedding.dtype
        assert_close_rel(demb, want_demb, rel, "dembedding", floor=floor)


def _forward_and_backward(ops, logits, labels, embedding, options, coefficients, *, with_lse=True):
    """forward_rows then backward_rows: ((ce, cos, correct, lse), dlogits, dembedding)."""
    grad_ce, grad_cos, grad_lse = coefficients
    out = ops.forward_rows(logits, labels, embedding, options)
    dlogits, demb = ops.backward_rows(logits, labels, embedding, out.saved, grad_ce, grad_cos, options,
                                      need_logits_grad=True, need_embedding_grad=True,
                                      grad_lse=grad_lse if with_lse else None)
    return (out.ce, out.cos, out.correct, out.lse), dlogits, demb


def _check_against_oracle(ops, logits, labels, embedding, options, gen, *, with_lse=True, floor=1e-30):
    coefficients = _coefficients(gen, labels)
    rows, dlogits, demb = _forward_and_backward(ops, logits, labels, embedding, options, coefficients,
                                                with_lse=with_lse)
    grad_ce, grad_cos, grad_lse = coefficients
    *want_rows, want_dz, want_de = _oracle(logits, labels, embedding, options, grad_ce, grad_cos,
                                           grad_lse=grad_lse if with_lse else None)
    dtype = torch.float32 if logits.dtype == torch.float32 else torch.bfloat16
    _assert_rows_agree(rows, want_rows, dtype)
    _assert_gradients_agree(dlogits, demb, want_dz, want_de, logits, embedding, options.temperature, floor)
    return rows, dlogits, demb


# ------------------------------------------------------------------------------------------------
# Each option alone and together, on each path


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_options_float32(ops, tune, gen, option_set, path):
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits, labels, embedding = make_inputs(gen, 7, VOCAB, 5, scale=3.0)
    _check_against_oracle(ops, logits, labels, embedding, _loss_options(topk, VOCAB, **OPTION_SETS[option_set]), gen)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("option_set", ["cap2", "scale2+cap2+smooth0.1", "scale0.5+cap30+smooth1"])
def test_options_bfloat16(ops, tune, gen, option_set, path):
    """bfloat16 logits and embedding: S is chosen by float32 keys of z', not the logits' 16-bit keys."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits, labels, embedding = make_inputs(gen, 7, VOCAB, 5, dtype=torch.bfloat16, ties=path == "K<V", scale=3.0)
    _check_against_oracle(ops, logits, labels, embedding, _loss_options(topk, VOCAB, **OPTION_SETS[option_set]), gen)


@pytest.mark.parametrize("path", ["K<V", "dense", "ce-only"])
def test_backward_without_the_lse_term(ops, tune, gen, path):
    """grad_lse=None: the gradient of grad_ce ce + grad_cos cos alone."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits, labels, embedding = make_inputs(gen, 6, VOCAB, 5)
    _check_against_oracle(ops, logits, labels, embedding, _loss_options(topk, VOCAB, **ALL_ON), gen, with_lse=False)


def test_dense_path_on_a_vocabulary_above_the_sparse_limit(ops, gen):
    """topk=None with V = 1100 > CONFIG.sparse_max_k: the dense path at its default configuration."""
    logits, labels, embedding = make_inputs(gen, 3, 1100, 4, scale=3.0)
    _check_against_oracle(ops, logits, labels, embedding, _loss_options(None, 1100, **ALL_ON), gen)


# ------------------------------------------------------------------------------------------------
# The z-loss in the forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["K<V", "K>=V", "dense", "ce-only"])
@pytest.mark.parametrize("inplace", [False, True], ids=["gradient", "inplace"])
def test_forward_backward_with_the_z_loss(ops, tune, gen, path, dtype, inplace):
    """forward_backward_rows with grad_lse_square: the gradient of ... + grad_lse_square lse ** 2, whose
    lse coefficient 2 grad_lse_square lse_n the row kernel forms once it has the row's lse."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits, labels, embedding = make_inputs(gen, 7, VOCAB, 5, dtype=dtype, scale=3.0)
    options = _loss_options(topk, VOCAB, **ALL_ON)
    grad_ce, grad_cos, grad_lse_square = _coefficients(gen, labels)
    grad_lse_square = grad_lse_square.abs()
    given = logits.clone()
    ce, cos, correct, lse, dlogits, demb = ops.forward_backward_rows(
        given, labels, embedding, grad_ce, grad_cos, options, need_logits_grad=True, need_embedding_grad=True,
        inplace=inplace, grad_lse_square=grad_lse_square)
    assert (dlogits is given) == inplace
    *want_rows, want_dz, want_de = _oracle(logits, labels, embedding, options, grad_ce, grad_cos,
                                           grad_lse_square=grad_lse_square)
    _assert_rows_agree((ce, cos, correct, lse), want_rows, dtype)
    _assert_gradients_agree(dlogits, demb, want_dz, want_de, logits, embedding)


def test_forward_backward_without_the_z_loss_equals_the_two_calls(ops, gen):
    """grad_lse_square=None: the same gradients as forward_rows + backward_rows with no lse term."""
    logits, labels, embedding = make_inputs(gen, 6, VOCAB, 5)
    options = _loss_options(5, VOCAB, **ALL_ON)
    grad_ce, grad_cos, _ = _coefficients(gen, labels)
    *_, dlogits, demb = ops.forward_backward_rows(logits, labels, embedding, grad_ce, grad_cos, options,
                                                  need_logits_grad=True, need_embedding_grad=True)
    *_, want_dz, want_de = _oracle(logits, labels, embedding, options, grad_ce, grad_cos)
    _assert_gradients_agree(dlogits, demb, want_dz, want_de, logits, embedding)


# ------------------------------------------------------------------------------------------------
# Edge cases


def _capped_ties():
    """Rows whose S and argmax the cap decides: distinct logits above 30 * 17 all become 30.0 in
    float32 under a cap of 30, and then the lower index wins.

    row 0, K = 1: 1001 at index 5, 1000 at index 2: S = {2} (the logits' order would take 5), and
        argmax z' = 2 = the label;
    row 1, K = 1: the same values, label 5: argmax z' = 2 != 5;
    row 2: 1003, 1000, 1002, 1001 at indices 1, 3, 6, 9, K = 2: S = {1, 3} (the logits: {1, 6})."""
    logits = torch.full((3, 12), -1.0)
    logits[0, 5], logits[0, 2] = 1001.0, 1000.0
    logits[1, 5], logits[1, 2] = 1001.0, 1000.0
    logits[2, [1, 3, 6, 9]] = torch.tensor([1003.0, 1000.0, 1002.0, 1001.0])
    labels = torch.tensor([2, 5, 6])
    return logits, labels


@pytest.mark.parametrize("path", ["sparse", "fallback", "dense"])
def test_ties_made_by_the_cap_take_the_lower_index(ops, tune, gen, path):
    """S and argmax are of z': where the cap makes distinct logits equal, the lower index is taken."""
    if path == "fallback":
        tune(candidate_capacity=1)  # every row redoes the selection over the whole row
    if path == "dense":
        tune(sparse_max_k=0)
    logits, labels = _capped_ties()
    embedding = torch.randn(12, 6, generator=gen)
    for row, k in ((0, 1), (1, 1), (2, 2)):
        z, y = logits[row:row + 1], labels[row:row + 1]
        options = _loss_options(k, 12, softcap=30.0)
        # (row 0: cos = 1, where the gradients are 0 up to rounding: against their natural size 1)
        rows, _, _ = _check_against_oracle(ops, z, y, embedding, options, gen, floor=1.0)
        chosen = {0: [2], 1: [2], 2: [1, 3]}[row]
        e = embedding[y[0]]
        mu = embedding[chosen].mean(0)  # the capped values are equal: equal weights
        assert torch.allclose(rows[1][0], torch.nn.functional.cosine_similarity(mu, e, dim=0), atol=1e-6)
        assert bool(rows[2][0]) == (row == 0)


@pytest.mark.parametrize("path", ["K<V", "dense", "ce-only"])
def test_infinite_logits_under_a_cap_are_finite_with_zero_gradient(ops, tune, gen, path):
    """Under a cap -inf becomes -c and +inf becomes c: the row is finite (ce too, with smoothing) and the
    entries at +-inf get exactly zero gradient (1 - tanh^2 = 0 there)."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits, labels, embedding = make_inputs(gen, 6, VOCAB, 5, neg_inf_frac=0.5, ignore_frac=0.0)
    not_label = (labels + 1) % VOCAB
    logits[[0, 3], not_label[[0, 3]]] = float("inf")
    options = _loss_options(topk, VOCAB, softcap=2.0, label_smoothing=0.1)
    rows, dlogits, _ = _check_against_oracle(ops, logits, labels, embedding, options, gen)
    ce, cos, _, lse = rows
    assert torch.isfinite(ce).all() and torch.isfinite(cos).all() and torch.isfinite(lse).all()
    infinite = torch.isinf(logits)
    assert infinite.sum() > VOCAB and torch.equal(dlogits[infinite], torch.zeros_like(dlogits[infinite]))


@pytest.mark.parametrize("path", ["K<V", "dense", "ce-only"])
def test_every_row_ignored(ops, tune, path):
    """Every option on and every position ignored: zeros everywhere (ce, cos, lse, the gradients)."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits = torch.randn(5, VOCAB) * 3
    labels = torch.full((5,), IGNORE)
    embedding = torch.randn(VOCAB, 4)
    options = _loss_options(topk, VOCAB, **ALL_ON)
    coefficient = torch.ones(5)  # nonzero: the kernels must not use them at ignored rows
    out = ops.forward_rows(logits, labels, embedding, options)
    for value in (out.ce, out.cos, out.lse):
        assert torch.equal(value, torch.zeros(5))
    assert not out.correct.any()
    dlogits, demb = ops.backward_rows(logits, labels, embedding, out.saved, coefficient, coefficient, options,
                                      need_logits_grad=True, need_embedding_grad=True, grad_lse=coefficient)
    *fused_rows, fused_dlogits, fused_demb = ops.forward_backward_rows(
        logits, labels, embedding, coefficient, coefficient, options, need_logits_grad=True,
        need_embedding_grad=True, grad_lse_square=coefficient)
    for value in fused_rows[:2] + fused_rows[3:]:
        assert torch.equal(value, torch.zeros(5))
    for gradient, like in ((dlogits, logits), (fused_dlogits, logits), (demb, embedding), (fused_demb, embedding)):
        if options.with_cos or like is logits:
            assert torch.equal(gradient, torch.zeros_like(like))
        else:
            assert gradient is None


# ------------------------------------------------------------------------------------------------
# The kernels' other code paths with the options on


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e5), (torch.bfloat16, 1e3)])
def test_rows_of_several_blocks_of_lanes_with_offset_logits(ops, tune, gen, dtype, offset):
    """Rows of many blocks of lanes (as V = 50257 is on a GPU): the smoothing's sum of z' - max is
    carried per lane and moved with the lane's running maximum. Offset logits (z ~ 1e5 + N(0, 9) in
    float32) check that it is relative to the maximum: a plain sum of z' less V max made ce 3e-3 off there."""
    tune(sparse_row_lanes=16, row_lanes=32)
    logits, labels, embedding = make_inputs(gen, 6, 200, 5, scale=3.0)
    logits = (logits.double() + offset).to(dtype)
    for topk in (9, "ce-only"):
        _check_against_oracle(ops, logits, labels, embedding,
                              _loss_options(topk, 200, logit_scale=0.5, label_smoothing=1.0), gen)


def test_candidate_overflow_falls_back_with_the_options(ops, tune, gen):
    """The selection's whole-row fallback (more candidates than the scratch holds) on z'."""
    tune(candidate_capacity=6)
    logits, labels, embedding = make_inputs(gen, 7, 70, 5, ties=True)
    _check_against_oracle(ops, logits, labels, embedding, _loss_options(7, 70, **ALL_ON), gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tiles_with_the_options(ops, tune, gen, dtype):
    """The GPU's launch configuration (one row per program step, one vocabulary row per program),
    H in several chunks, S's entries in several pieces, with the gradient in the forward too."""
    tune(interpreter_tiles=False, hidden_chunk=16, piece_entries=2 * 20)
    logits, labels, embedding = make_inputs(gen, 4, 70, 40, dtype=dtype, scale=3.0)
    options = _loss_options(20, 70, **ALL_ON)
    _check_against_oracle(ops, logits, labels, embedding, options, gen)
    grad_ce, grad_cos, grad_lse_square = _coefficients(gen, labels)
    *rows, dlogits, demb = ops.forward_backward_rows(logits, labels, embedding, grad_ce, grad_cos, options,
                                                     need_logits_grad=True, need_embedding_grad=True,
                                                     grad_lse_square=grad_lse_square)
    *want_rows, want_dz, want_de = _oracle(logits, labels, embedding, options, grad_ce, grad_cos,
                                           grad_lse_square=grad_lse_square)
    _assert_rows_agree(rows, want_rows, torch.float32 if dtype == torch.float32 else torch.bfloat16)
    _assert_gradients_agree(dlogits, demb, want_dz, want_de, logits, embedding)


@pytest.mark.parametrize("path", ["K<V", "dense", "ce-only"])
def test_fake_forward_matches_the_real_one_with_the_options(ops, tune, path):
    """The options change no shape or dtype of what forward_rows returns (lse included)."""
    topk, knobs = PATHS[path]
    tune(**knobs)
    logits = torch.randn(5, VOCAB, dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (5,))
    embedding = torch.randn(VOCAB, 4)
    options = _loss_options(topk, VOCAB, **ALL_ON)
    real = ops.forward_rows(logits, labels, embedding, options)
    fake = ops.fake_forward_rows(logits, labels, embedding, options)
    off = ops.forward_rows(logits, labels, embedding, _loss_options(topk, VOCAB))
    for other in (fake, off):
        assert [(t.shape, t.dtype) for t in (*real[:4], *real.saved)] == [(t.shape, t.dtype)
                                                                          for t in (*other[:4], *other.saved)]


def test_transformed_values_agree_with_float64(ops):
    """The kernels' tanh (transform.py) against float64 on a dense grid of [-12, 12] and the special
    values: z' within 2 float32 epsilons relative (the spec allows backends an ulp of tanh apart), exact at
    +-inf (+-c), NaN and the signed zeros."""
    import triton

    from fused_cosloss.triton_ops.dense import transformed_block_kernel

    grid = torch.cat([torch.linspace(-12.0, 12.0, 20001), torch.logspace(-30, 0, 301),
                      torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30])])
    out = torch.empty(1, grid.numel())
    slope = torch.empty(1, grid.numel())
    transformed_block_kernel[(1, triton.cdiv(grid.numel(), 1024))](
        grid[None], grid.numel(), out, slope, grid.numel(), scale=1.0, inv_cap=1.0, cap=1.0, SCALE=False, CAP=True,
        BV=1024)
    want = torch.tanh(grid.double())
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    finite = torch.isfinite(grid)
    assert ((out[0].double() - want).abs()[finite] <= 2 * ulp[finite]).all()
    assert out[0, -6:-4].tolist() == [1.0, -1.0] and slope[0, -6:-4].tolist() == [0.0, 0.0]
    assert torch.equal(out[0, -4:-2], grid[-4:-2]) and torch.equal(torch.signbit(out[0, -4:-2]), torch.tensor([False, True]))
    assert torch.isnan(ops.forward_rows(torch.tensor([[float("nan"), 1.0]]), torch.tensor([1]), torch.randn(2, 3),
                                        _loss_options(1, 2, softcap=2.0)).ce).all()
