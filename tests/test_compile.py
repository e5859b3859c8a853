"""torch.compile: ``mixed_loss`` traces as one graph (no breaks) and equals eager, forward and backward.

The kernel backends enter the graph as the custom ops of ``fused_cosloss.compile_ops``; the
reference and the argument checks trace without host syncs. Shapes are tiny and static
(``dynamic=False``): compilation on a 2-core CPU dominates the cost of these tests.
"""
from __future__ import annotations

import pytest
import torch

from fused_cosloss import mixed_loss
from fused_cosloss import compile_ops  # noqa: F401  (registers the ops)
from fused_cosloss.options import LossOptions

from conftest import BACKEND_PARAMS, backend_or_skip
from helpers import UNIT_FLOORS, assert_agrees, assert_close_rel, make_inputs, run_and_backprop

REL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(logits, labels, embedding, *, backend, topk, alpha, reduction="mean", shift=False):
    out = mixed_loss(logits, labels, embedding, alpha=alpha, temperature=0.7, topk=topk, backend=backend,
                     reduction=reduction, shift=shift, return_parts=True)
    return out.loss, out.ce, out.cos, out.n_valid, out.n_correct, out.cos_sim_sum


def _run(fn, logits, labels, embedding, **options):
    """The six outputs of ``fn`` and the gradients of the loss (summed) on fresh leaf copies."""
    return run_and_backprop(lambda logits, labels, embedding: fn(logits, labels, embedding, **options),
                            dict(logits=logits, labels=labels, embedding=embedding), parts=("loss",))


def _check_equal(compiled, eager, what):
    """Counts exactly; values against max(|eager|, 1); gradients relative to their largest entry."""
    assert_agrees(compiled, eager, rel=REL, what=what, floors=UNIT_FLOORS)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_compile_fullgraph_equals_eager(backend, ties, gen):
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 12, 24, 8, ties=ties, device=device)
    labels[0] = -100
    logits[0, 3] = float("nan")  # an ignored row may hold anything: it must not leak into the loss
    options = dict(backend=name, topk=5, alpha=0.6)

    explanation = torch._dynamo.explain(_step)(logits, labels, embedding, **options)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    _check_equal(_run(compiled, logits, labels, embedding, **options),
                 _run(_step, logits, labels, embedding, **options), f"{name}/{device}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_compile_shift_sum_full_vocabulary(backend, gen):
    """Causal shift on [B, T, V], reduction="sum", topk=None (the whole vocabulary), bfloat16-free."""
    name, device = backend
    backend_or_skip(name, device)
    logits, labels, embedding = make_inputs(gen, 10, 16, 8, device=device)
    logits, labels = logits.reshape(2, 5, 16), labels.reshape(2, 5)
    options = dict(backend=name, topk=None, alpha=0.3, reduction="sum", shift=True)
    compiled = torch.compile(_step, fullgraph=True, dynamic=False, backend="aot_eager")
    _check_equal(_run(compiled, logits, labels, embedding, **options),
                 _run(_step, logits, labels, embedding, **options), f"{name}/{device} shift")


def test_compile_training_step_module(gen):
    """A compiled step through a tied model: gradients of the shared weight equal eager."""
    backend_or_skip("native", "cpu")
    torch.manual_seed(0)
    model = torch.nn.Embedding(24, 8)
    tokens = torch.randint(0, 24, (2, 6), generator=gen)

    def step(weight, tokens):
        hidden = torch.nn.functional.embedding(tokens, weight)
        logits = hidden @ weight.T
        return mixed_loss(logits, tokens, weight, topk=4, shift=True, backend="native")

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")):
        weight = model.weight.detach().clone().requires_grad_(True)
        loss = fn(weight, tokens)
        loss.backward()
        grads.append((loss.detach(), weight.grad))
    assert_close_rel(grads[1][0], grads[0][0], REL, "loss")
    assert_close_rel(grads[1][1], grads[0][1], REL, "dweight")


def test_compiled_label_check_still_raises(gen):
    """Out-of-range labels are caught in the graph by a device-side assertion (no host sync while tracing)."""
    logits, labels, embedding = make_inputs(gen, 4, 8, 4, ignore_frac=0.0)
    labels[2] = 8
    compiled = torch.compile(_step, fullgraph=True, dynamic=False, backend="aot_eager")
    with pytest.raises(RuntimeError, match="labels"):
        compiled(logits, labels, embedding, backend="reference", topk=3, alpha=0.5)


KERNEL_BACKENDS = [
    pytest.param(("native", "cpu"), id="native-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_cos", [True, False])
def test_custom_ops_opcheck(backend, with_cos, gen):
    """torch.library.opcheck: schema, fake kernels (shapes, dtypes, strides of the saved state),
    autograd registration and AOT dispatch of the kernel ops."""
    name, device = backend
    backend_or_skip(name, device)
    # the Triton kernels leave the saved top-k of ignored rows unwritten (never read), which opcheck
    # would compare between runs: no ignored rows there
    ignore_frac = 0.0 if name == "triton" else 0.25
    logits, labels, embedding = make_inputs(gen, 6, 16, 8, device=device, ignore_frac=ignore_frac)
    logits.requires_grad_(True)
    embedding.requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_cosloss.rows_forward.default,
                          (name, logits, labels, embedding, *LossOptions(0.7, 4, -100, with_cos).as_schema_args()))
