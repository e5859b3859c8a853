"""No silent wrong answer (issue 19): every backend either computes these exactly or raises.

Higher-order gradients (a gradient penalty through ``create_graph=True``) against float64
autograd; logits offset by 1e3 to 1e30 against float64 ``log_softmax``; an empty input
whatever its strides; the reference's precision under autocast; bfloat16 subnormal logits.
Inputs come from the ``gen`` fixture (the session seed is printed in the header).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_or_skip
from fused_cosloss import UnsupportedDifferentiationError, mixed_loss
from helpers import assert_close_rel, gradient_tolerance, make_inputs, tolerance
from spec_oracle import spec_rows

IGNORE = -100


def reduce_rows(rows, valid, reduction):
    """docs/spec.md's reduction of per-position values (0 at ignored positions already)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(int(valid.sum()), 1) if reduction == "mean" else total


def penalised_gradients(loss_fn, logits, embedding=None, weight=10.0):
    """Gradients of ``loss + weight * |d loss / d logits|^2`` (a gradient penalty: the first
    gradient is taken with ``create_graph=True`` and differentiated again) with respect to the
    logits (and the embedding, when given), on fresh leaf copies."""
    z = logits.detach().clone().requires_grad_()
    leaves = [z]
    e = None
    if embedding is not None:
        e = embedding.detach().clone().requires_grad_()
        leaves.append(e)
    loss = loss_fn(z, e).sum()
    (first,) = torch.autograd.grad(loss, z, create_graph=True)
    total = loss + weight * (first.double() ** 2).sum()
    return torch.autograd.grad(total, leaves)


# --------------------------------------------------------------------------- higher-order gradients


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_in_forward", [None, False], ids=["grad_in_forward=None", "grad_in_forward=False"])
def test_gradient_penalty_at_alpha_0_equals_cross_entropys(backend, gen, grad_in_forward, reduction):
    """alpha = 0 is plain cross-entropy: the penalised gradient is F.cross_entropy's in float64,
    or (only where the gradient was computed in the forward) the package's error naming a path
    that works; that path (grad_in_forward=False) is the other parameter of this test."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 7, 40, 8, device=device)
    (expected,) = penalised_gradients(
        lambda z, _: F.cross_entropy(z, labels, ignore_index=IGNORE, reduction=reduction), logits.double())
    try:
        (actual,) = penalised_gradients(
            lambda z, _: mixed_loss(z, labels, embedding, alpha=0.0, backend=name, reduction=reduction,
                                    grad_in_forward=grad_in_forward), logits)
    except UnsupportedDifferentiationError as error:
        assert name != "reference", f"the reference must differentiate its gradient: {error}"
        assert grad_in_forward is None and reduction != "none", f"raised where the backward was differentiable: {error}"
        assert "grad_in_forward=False" in str(error) and "create_graph" in str(error)
        return
    assert_close_rel(actual, expected, gradient_tolerance(torch.float32, 1.0), "penalised dlogits")


@pytest.mark.parametrize("topk, temperature", [(5, 1.0), (5, 0.5), (None, 1.0)], ids=["topk5", "topk5-T0.5", "dense"])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_gradient_penalty_with_cosine_term_matches_float64_spec(backend, gen, alpha, topk, temperature):
    """alpha > 0: the penalised gradients of logits and embedding against float64 double-backward
    autograd of the spec's literal transcription (tests/spec_oracle.py)."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 24, 8, device=device)

    def spec(z, e):
        ce, dist, _, _, valid = spec_rows(z, labels, e, temperature, topk, IGNORE)
        return reduce_rows(alpha * dist + (1 - alpha) * ce, torch.tensor(valid), "mean")

    expected = penalised_gradients(spec, logits.double(), embedding.double())
    actual = penalised_gradients(
        lambda z, e: mixed_loss(z, labels, e, alpha=alpha, topk=topk, temperature=temperature, backend=name,
                                grad_in_forward=False), logits, embedding)
    rel = gradient_tolerance(torch.float32, temperature)
    assert_close_rel(actual[0], expected[0], rel, "penalised dlogits")
    assert_close_rel(actual[1], expected[1], rel, "penalised dembedding")


def test_reference_gradient_penalty_in_float64_is_exact(gen):
    """The reference differentiates its own gradient (embedding_bag's backward has no derivative:
    the top-k path must not go through it then) to float64 precision."""
    logits, labels, embedding = make_inputs(gen, 6, 30, 8, dtype=torch.float64)

    def spec(z, e):
        ce, dist, _, _, valid = spec_rows(z, labels, e, 0.7, 6, IGNORE)
        return reduce_rows(0.4 * dist + 0.6 * ce, torch.tensor(valid), "sum")

    expected = penalised_gradients(spec, logits, embedding)
    actual = penalised_gradients(
        lambda z, e: mixed_loss(z, labels, e, alpha=0.4, topk=6, temperature=0.7, reduction="sum",
                                backend="reference"), logits, embedding)
    assert_close_rel(actual[0], expected[0], 1e-10, "penalised dlogits")
    assert_close_rel(actual[1], expected[1], 1e-10, "penalised dembedding")


@pytest.mark.parametrize("name", ["reference", "native", "triton"])
def test_inplace_grad_refuses_a_differentiable_backward(name, gen):
    """inplace_grad copies the gradient into the logits' storage: it has no graph, so a backward with
    create_graph=True must raise rather than drop the second-order term."""
    backend_or_skip(name, "cpu")
    logits, labels, embedding = make_inputs(gen, 5, 20, 4)
    z = logits.clone().requires_grad_()
    loss = mixed_loss(z * 1.0, labels, embedding, alpha=0.5, topk=4, backend=name, inplace_grad=True,
                      grad_in_forward=False)
    with pytest.raises(UnsupportedDifferentiationError, match="inplace_grad=False"):
        torch.autograd.grad(loss, z, create_graph=True)


# --------------------------------------------------------------------------- offset logits


def offset_inputs(gen, offset, n=6, vocab=30, hidden=8):
    """float32 logits ``offset + N(0, 4)`` (at 1e30 that rounds to 1e30 exactly: all tied) with every
    third entry 0 (far below the rest), labels among the others, some ignored; and an embedding."""
    logits = offset + 2.0 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    logits[:, ::3] = 0.0
    labels = 3 * torch.randint(0, vocab // 3, (n,), generator=gen) + 1 + torch.randint(0, 2, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = IGNORE
    embedding = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    return logits.float(), labels, embedding.float()


@pytest.mark.parametrize("alpha, topk", [(0.0, 8), (0.5, 8), (0.5, None)], ids=["ce", "mixed-topk8", "mixed-dense"])
@pytest.mark.parametrize("offset", [1e3, 1e5, 1e30], ids=["1e3", "1e5", "1e30"])
def test_offset_logits_keep_their_precision(backend, gen, offset, alpha, topk):
    """ce and the gradients relative to the row maximum: against float64 F.cross_entropy
    (log_softmax: exact at any offset) plus the spec's cosine term, and their autograd."""
    name, device = backend
    logits, labels, embedding = offset_inputs(gen, offset)
    valid = labels != IGNORE

    def expected_loss(z, e):
        ce = F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="none")
        _, dist, _, _, _ = spec_rows(z, labels, e, 1.0, topk, IGNORE)
        return reduce_rows(alpha * dist + (1 - alpha) * ce, valid, "mean"), reduce_rows(ce, valid, "mean")

    z64 = logits.double().requires_grad_()
    e64 = embedding.double().requires_grad_()
    loss64, ce64 = expected_loss(z64, e64)
    loss64.backward()

    z = logits.to(device).requires_grad_()
    e = embedding.to(device).requires_grad_()
    out = mixed_loss(z, labels.to(device), e, alpha=alpha, topk=topk, backend=name, return_parts=True)
    out.loss.backward()
    rel = tolerance(torch.float32)
    assert_close_rel(out.ce, ce64, rel, "ce")
    assert_close_rel(out.loss, loss64, rel, "loss")
    assert_close_rel(z.grad, z64.grad, rel, "dlogits")
    if alpha > 0:
        assert_close_rel(e.grad, e64.grad, rel, "dembedding")


@pytest.mark.parametrize("label, expected_ce, expected_grad", [
    (1, 0.6931471805599453, [0.5, -0.5, 0.0]),
    (2, 1e30 + 0.6931471805599453, [0.5, 0.5, -1.0]),
])
def test_two_tied_huge_logits(backend, label, expected_ce, expected_grad):
    """The issue's example [[1e30, 1e30, 0]]: ce = log 2 and dz = [.5, -.5, 0] at label 1 (the
    numbers follow from softmax = [1/2, 1/2, 0] by hand)."""
    name, device = backend
    z = torch.tensor([[1e30, 1e30, 0.0]], device=device, requires_grad=True)
    loss = mixed_loss(z, torch.tensor([label], device=device), torch.randn(3, 4, device=device), alpha=0.0,
                      backend=name)
    loss.backward()
    assert_close_rel(loss, torch.tensor(expected_ce, dtype=torch.float64), tolerance(torch.float32), "ce")
    assert_close_rel(z.grad, torch.tensor([expected_grad]), tolerance(torch.float32), "dlogits")


# --------------------------------------------------------------------------- empty inputs


def empty_strided_logits(kind, requires_grad, device="cpu"):
    """[0, 8] float32 logits whose last stride is not 1, and the leaf the gradient lands on."""
    if kind == "transposed":
        leaf = torch.randn(8, 5, device=device, requires_grad=requires_grad)
        return leaf.t()[:0], leaf
    logits = torch.from_numpy(np.zeros((8, 5), dtype=np.float32).T[:0])
    return logits.requires_grad_(requires_grad), logits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["transposed", "numpy"])
def test_empty_input_with_any_strides(backend, kind, reduction):
    """N = 0 is valid whatever the strides: loss 0 (mean and sum) or an empty [0], zero gradients."""
    name, device = backend
    if kind == "numpy" and device != "cpu":
        pytest.skip("numpy arrays live on the CPU")
    logits, leaf = empty_strided_logits(kind, requires_grad=True, device=device)
    assert logits.shape == (0, 8) and logits.stride(-1) != 1
    labels = torch.zeros(0, dtype=torch.long, device=device)
    embedding = torch.randn(8, 4, device=device, requires_grad=True)
    for grad_in_forward in (None, False):
        leaf.grad = embedding.grad = None
        out = mixed_loss(logits, labels, embedding, alpha=0.5, topk=4, reduction=reduction, backend=name,
                         grad_in_forward=grad_in_forward)
        if reduction == "none":
            assert out.shape == (0,)
        else:
            assert out.shape == () and float(out.detach()) == 0.0
        out.sum().backward()
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any()
        assert embedding.grad is None or not embedding.grad.any()
    with torch.no_grad():
        parts = mixed_loss(logits, labels, embedding, reduction=reduction, backend=name, return_parts=True)
    assert int(parts.n_valid) == 0 and int(parts.n_correct) == 0


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("topk", [None, 6], ids=["dense", "topk6"])
def test_autocast_does_not_change_the_loss(backend, gen, topk):
    """The loss is computed in float32 whatever autocast says: under torch.autocast(bfloat16) the
    loss and the gradients equal those of the same call without autocast."""
    name, device = backend
    logits, labels, embedding = make_inputs(gen, 6, 40, 16, device=device)

    def run():
        z, e = logits.clone().requires_grad_(), embedding.clone().requires_grad_()
        loss = mixed_loss(z, labels, e, alpha=0.5, topk=topk, backend=name)
        loss.backward()
        return loss, z.grad, e.grad

    plain = run()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        under_autocast = run()
    for what, a, b in zip(("loss", "dlogits", "dembedding"), under_autocast, plain):
        assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} under autocast, {b.dtype} without"
        assert_close_rel(a, b, 1e-6, what)


# --------------------------------------------------------------------------- bfloat16 subnormals


def triton_interpreter_cast_flushes_bf16_subnormals() -> bool:
    """Whether Triton's interpreter turns the bfloat16 subnormal 2**-130 into something else than
    2**-130 when casting it to float32 (triton 3.9's interpreter gives 0: its ``_convert_float``
    drops the significand of subnormals). A GPU converts it exactly."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_float32(x_ptr, out_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))

    x = torch.full((4,), 2.0**-130, dtype=torch.bfloat16)
    out = torch.empty(4, dtype=torch.float32)
    to_float32[(1,)](x, out, 4)
    return not torch.equal(out, x.float())


def bf16_subnormal_inputs(gen, n=4, vocab=40, hidden=8):
    """bfloat16 logits that are all subnormal (|z| < 2**-126), labels and a float32 embedding."""
    logits = (torch.randn(n, vocab, generator=gen) * 2.0**-130).to(torch.bfloat16)
    assert (logits.float().abs() < 2.0**-126).all()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return logits, labels, torch.randn(vocab, hidden, generator=gen)


def check_bf16_subnormal_logits(name, gen, device="cpu"):
    logits, labels, embedding = bf16_subnormal_inputs(gen)
    z64, e64 = logits.double().requires_grad_(), embedding.double().requires_grad_()
    ce, dist, _, _, valid = spec_rows(z64, labels, e64, 1.0, 8, IGNORE)
    expected = reduce_rows(0.5 * dist + 0.5 * ce, torch.tensor(valid), "mean")
    expected.backward()
    z, e = logits.to(device).requires_grad_(), embedding.to(device).requires_grad_()
    loss = mixed_loss(z, labels.to(device), e, alpha=0.5, topk=8, backend=name)
    loss.backward()
    assert_close_rel(loss, expected, tolerance(torch.float32), "loss")
    assert_close_rel(z.grad, z64.grad, gradient_tolerance(torch.bfloat16, 1.0), "dlogits")
    assert_close_rel(e.grad, e64.grad, tolerance(torch.float32), "dembedding")


def test_bf16_subnormal_logits(backend, gen):
    """All-subnormal bfloat16 logits (softmax ~ uniform) against the float64 spec."""
    name, device = backend
    if name == "triton" and device == "cpu" and triton_interpreter_cast_flushes_bf16_subnormals():
        pytest.skip("the Triton interpreter is at fault, not the kernel: its bfloat16 <-> float32 casts lose "
                    "subnormals (bf16 2**-130 -> 0.0; checked by triton_interpreter_cast_flushes_bf16_subnormals), "
                    "so the kernel sees other logits (NaN gradients). With an exact cast the interpreted kernel "
                    "matches (test_triton_kernel_with_an_exact_interpreter_cast_handles_bf16_subnormals); "
                    "a GPU converts exactly: the triton-cuda case runs this test there")
    check_bf16_subnormal_logits(name, gen, device)


def test_triton_kernel_with_an_exact_interpreter_cast_handles_bf16_subnormals(gen, monkeypatch):
    """Evidence that the interpreter, not the kernel, is at fault: with the interpreter's
    bfloat16 <-> float32 casts replaced by exact ones (bit shifts, torch's rounding), the
    interpreted Triton kernel computes subnormal bfloat16 logits correctly."""
    backend_or_skip("triton", "cpu")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import triton.language as tl

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.cast_impl to replace")
    inexact_cast = builder.cast_impl

    def exact_cast(self, src, dst_type):
        source, target = src.dtype.scalar, dst_type.scalar
        if source == tl.bfloat16 and target == tl.float32:
            bits = np.ascontiguousarray(src.data).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), target)
        if source == tl.float32 and target == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), target)
        return inexact_cast(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", exact_cast)
    assert not triton_interpreter_cast_flushes_bf16_subnormals()
    check_bf16_subnormal_logits("triton", gen)
