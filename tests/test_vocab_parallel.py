"""The vocabulary-parallel layout (``process_group``): P = 2, 3, 4 CPU processes (gloo), each holding
a contiguous shard of the vocabulary, compute the loss of the whole vocabulary; its value, its
parts and every rank's shard gradients equal the single-process reference's on the gathered
tensors (float64: to rounding; bfloat16 inputs: both compute in float32).

Each case's inputs come from its seed on every rank; the parent process runs the single-process
loss itself and compares. The cases cover uneven shards, shards placed out of rank order
(``vocab_start``), ties across a shard boundary (integer logits), rows whose top-K lies in one
shard, K larger than a shard, the whole vocabulary (``topk=None``), ignore_index and an all-ignored
batch, every reduction, ``shift``, the loss options, per-position weights, bfloat16, and the
fused-linear mode (a row-sharded LM head; the hidden states' gradient summed over the ranks).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from fused_cosloss import LinearMixedLoss, MixedLoss, UnsupportedDifferentiationError, linear_mixed_loss, mixed_loss

from gloo_ranks import free_port, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

HIDDEN = 6
BASE = dict(alpha=0.5, temperature=0.7, topk=4, reduction="mean")
CASES = {
    2: [
        dict(name="ties across the boundary", sizes=[9, 11], ties=True, ignore=3),
        dict(name="K above a shard's size, module", sizes=[9, 11], topk=12, reduction="sum", module=True),
        dict(name="bfloat16", sizes=[12, 8], dtype="bfloat16", topk=5),
        dict(name="fused linear, module", sizes=[10, 10], linear=True, ignore=2, softcap=4.0, module=True),
        dict(name="parts at alpha 1 and K 1", sizes=[7, 13], alpha=1.0, topk=1, parts=True),
        dict(name="offset logits", sizes=[9, 11], offset=3e4, label_smoothing=0.2, parts=True),
        # the Triton kernels past their sparse path give no candidates: torch.topk then selects them
        dict(name="candidates without the kernel's", sizes=[9, 11], ties=True, topk=5, sparse_max_k=2, softcap=1.5),
    ],
    3: [
        dict(name="options, weights, shift", sizes=[10, 7, 12], shift=True, topk=6, temperature=1.3, reduction="sum",
             label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.7, weight=True, parts=True),
        dict(name="top-K in one shard", sizes=[10, 7, 12], peak_shard=1, topk=5),
        dict(name="all ignored", sizes=[4, 4, 5], ignore=100, parts=True),
        dict(name="infinities, NaN in an ignored row", sizes=[6, 8, 5], infinities=True, topk=7, parts=True),
        dict(name="infinities under a cap", sizes=[6, 8, 5], infinities=True, softcap=2.5, topk=7),
        dict(name="fused linear, untied, shift", sizes=[5, 9, 6], linear=True, untied=True, shift=True,
             reduction="none"),
    ],
    4: [
        dict(name="whole vocabulary, out of rank order", sizes=[5, 6, 4, 8], topk=None, reduction="none",
             order=[3, 1, 0, 2], ties=True),
        dict(name="alpha 0, mean", sizes=[3, 9, 5, 6], alpha=0.0, ignore=4),
    ],
}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
LOSS_KEYS = ("alpha", "temperature", "topk", "reduction", "label_smoothing", "z_loss", "softcap", "logit_scale")


def _case(case: dict, backend: str = "reference") -> dict:
    """The case's arguments on ``backend``: the kernels take float32 where the reference takes float64."""
    case = {**BASE, **case, "backend": backend}
    if backend != "reference" and case.get("dtype", "float64") == "float64":
        case["dtype"] = "float32"
    return case


def _backends() -> list[str]:
    """The reference and the kernel backends that run here (the Triton kernels under the interpreter)."""
    from fused_cosloss.backends import why_unavailable

    probe = torch.empty(1, 1)
    return ["reference"] + [name for name in ("native", "triton") if why_unavailable(name, probe, probe) is None]


def _inputs(case: dict, seed: int, device: str = "cpu"):
    """The whole vocabulary's tensors: (logits or hidden, labels, embedding, head weight or None, weight,
    the upstream gradient of a "none" loss), made on the CPU and moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    vocab, dtype = sum(case["sizes"]), DTYPES[case.get("dtype", "float64")]
    shape = (2, 5) if case.get("shift") else (9,)
    n = 10 if case.get("shift") else 9
    labels = torch.randint(0, vocab, shape, generator=gen)
    flat = labels.view(-1)
    flat[torch.randperm(n, generator=gen)[:min(case.get("ignore", 0), n)]] = -100
    embedding = torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64)
    head = None
    if case.get("linear"):
        logits = torch.randn(*shape, HIDDEN, generator=gen, dtype=torch.float64)  # the hidden states
        head = torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN ** 0.5
    elif case.get("ties"):
        logits = torch.randint(0, 3, (*shape, vocab), generator=gen).to(torch.float64)
    else:
        logits = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * 2
    if case.get("offset"):  # every logit far from 0: the terms must still be computed relative to the maximum
        logits = logits + case["offset"]
    if case.get("peak_shard") is not None:
        start = sum(case["sizes"][:case["peak_shard"]])
        logits[..., start:start + case["sizes"][case["peak_shard"]]] += 20.0
    if case.get("infinities"):
        # -inf where a shard has fewer finite logits than K, a label at -inf, and NaN in an ignored row
        flat_logits, flat_labels = logits.view(-1, vocab), labels.view(-1)
        flat_logits[0, :vocab - 3] = float("-inf")
        flat_logits[1, 2:vocab:2] = float("-inf")
        flat_logits[2, flat_labels[2]] = float("-inf")
        flat_labels[3] = -100
        flat_logits[3, 4] = float("nan")
    weight = torch.rand(shape, generator=gen, dtype=torch.float64) if case.get("weight") else None
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    move = (lambda t: None if t is None else t.to(device))
    return cast(logits), move(labels), cast(embedding), cast(head), move(weight), move(upstream)


def _starts(case: dict) -> list[int]:
    """Each rank's first vocabulary row: the shards in ``order`` (rank order by default)."""
    sizes, order = case["sizes"], case.get("order", list(range(len(case["sizes"]))))
    starts, position = [0] * len(sizes), 0
    for rank in order:
        starts[rank] = position
        position += sizes[rank]
    return starts


def _run(case: dict, logits, labels, embedding, head, weight, upstream, **parallel):
    """(loss or its parts, gradients by name) of one call, whole or sharded."""
    options = {key: case[key] for key in LOSS_KEYS if key in case}
    leaves = {"input": logits.detach().requires_grad_(), "embedding": embedding.detach().requires_grad_()}
    common = dict(shift=case.get("shift", False), backend=case["backend"], **options, **parallel)
    parts = case.get("parts", False)
    if head is not None:
        leaves["head"] = head.detach().requires_grad_()
        embedding = leaves["embedding"] if case.get("untied") else None
        if case.get("module"):
            out = LinearMixedLoss(**common)(leaves["input"], leaves["head"], labels, embedding, return_parts=parts,
                                            position_weight=weight)
        else:
            out = linear_mixed_loss(leaves["input"], leaves["head"], labels, embedding=embedding,
                                    position_weight=weight, return_parts=parts, **common)
        if not case.get("untied"):
            del leaves["embedding"]
    elif case.get("module"):
        out = MixedLoss(**common)(leaves["input"], labels, leaves["embedding"], return_parts=parts, weight=weight)
    else:
        out = mixed_loss(leaves["input"], labels, leaves["embedding"], weight=weight, return_parts=parts, **common)
    loss = out.loss if case.get("parts") else out
    target = (loss * upstream[..., :loss.shape[-1]].to(loss.dtype)).sum() if case["reduction"] == "none" else loss
    target.backward()
    values = out._asdict() if case.get("parts") else {"loss": out}
    grads = {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}
    return {key: value.detach() for key, value in values.items()}, grads


def _sharded(case: dict, rank: int, group, device: str = "cpu"):
    logits, labels, embedding, head, weight, upstream = _inputs(case, seed=len(case["name"]), device=device)
    start, size = _starts(case)[rank], case["sizes"][rank]
    part = slice(start, start + size)
    if head is not None:
        head = head[part]
    else:
        logits = logits[..., part]
    explicit = {"vocab_start": start} if "order" in case else {}
    with _triton_knobs(case):
        return _run(case, logits, labels, embedding[part], head, weight, upstream, process_group=group, **explicit)


def _triton_knobs(case: dict):
    """The case's Triton configuration (``sparse_max_k``) for the Triton backend, else nothing."""
    import contextlib

    if case["backend"] != "triton" or "sparse_max_k" not in case:
        return contextlib.nullcontext()
    from fused_cosloss.triton_ops.config import override

    return override(sparse_max_k=case["sparse_max_k"])


def _rank_results(rank, world):
    """This rank's results of every case of its world size, and of the checks P = 2 also runs
    (run by gloo_ranks)."""
    results = {(case["name"], backend): _sharded(_case(case, backend), rank, dist.group.WORLD)
               for backend in _backends() for case in CASES[world]}
    results["errors"] = _refusals(rank, world)
    if world == 2:
        results["precision"] = _precision_results(rank)
        results["compiled"] = _compiled_and_eager(rank)
    return results


GPU_CASES = [case for case in CASES[2] if case["name"] != "parts at alpha 1 and K 1"]


def _gpu_rank_results(rank, world):
    """Two ranks on one CUDA device (gloo: its collectives go through the host), the reference and the
    Triton kernels on CUDA tensors."""
    return {(case["name"], backend): _to_cpu(_sharded(_case(case, backend), rank, dist.group.WORLD, "cuda"))
            for backend in ("reference", "triton") for case in GPU_CASES}


def _to_cpu(result):
    values, grads = result
    return {k: v.cpu() for k, v in values.items()}, {k: v.cpu() for k, v in grads.items()}


PRECISION_CASES = [(temperature, alpha, kind, topk) for temperature in (0.01, 1.0) for alpha in (0.5, 1.0)
                   for kind in ("peaked", "flat") for topk in (1, 17, None)]
PRECISION_SIZES = [23, 27]  # of test_precision.VOCAB = 50


def _precision_inputs(index: int):
    """test_precision's float32 inputs for the case ``index`` (its own seed)."""
    import test_precision

    temperature, alpha, kind, topk = PRECISION_CASES[index]
    gen = torch.Generator().manual_seed(1000 + index)
    options = dict(alpha=alpha, temperature=temperature, topk=topk)
    return test_precision._inputs(gen, test_precision.VOCAB, test_precision.LOGITS[kind], torch.float32), options


def _precision_results(rank: int) -> dict:
    """Each backend's sharded loss and this rank's shard gradients on test_precision's cases."""
    import test_precision

    start = sum(PRECISION_SIZES[:rank])
    part = slice(start, start + PRECISION_SIZES[rank])
    results = {}
    for backend in _backends():
        for index in range(len(PRECISION_CASES)):
            (logits, labels, embedding), options = _precision_inputs(index)
            results[index, backend] = test_precision._value_and_grads(
                lambda z, y, e: mixed_loss(z, y, e, backend=backend, process_group=dist.group.WORLD, **options),
                logits[:, part].contiguous(), labels, embedding[part].contiguous())
    return results


def _compiled_and_eager(rank: int):
    """The loss and this rank's logits gradient, eager and under torch.compile (a graph break there)."""
    case = _case(CASES[2][0], "native" if "native" in _backends() else "reference")
    logits, labels, embedding, _, _, _ = _inputs(case, seed=1, device="cpu")
    logits, embedding = logits.float(), embedding.float()
    part = slice(0, 9) if rank == 0 else slice(9, 20)

    def step(z, y, e):
        return mixed_loss(z, y, e, topk=4, backend=case["backend"], process_group=dist.group.WORLD) * 2.0

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        z = logits[:, part].clone().requires_grad_()
        loss = fn(z, labels, embedding[part].contiguous())
        loss.backward()
        results.append((loss.detach(), z.grad))
    return results


def _refusals(rank: int, world: int) -> dict:
    """The messages of the calls the layout refuses (every rank raises the same error: no hang)."""
    logits, labels = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3 * world, (4,))
    embedding = torch.randn(3, HIDDEN, dtype=torch.float64)
    errors = {}

    def record(name, call):
        try:
            call()
        except (ValueError, TypeError, UnsupportedDifferentiationError) as error:
            errors[name] = f"{type(error).__name__}: {error}"

    group = dist.group.WORLD
    record("overlap", lambda: mixed_loss(logits, labels, embedding, process_group=group, vocab_start=0))
    record("positions", lambda: mixed_loss(logits[:4 - (rank == 0)], labels[:4 - (rank == 0)], embedding,
                                           process_group=group))
    record("labels", lambda: mixed_loss(logits, labels + 3 * world, embedding, process_group=group))

    def higher_order():
        z = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(mixed_loss(z, labels, embedding, process_group=group), z, create_graph=True)
        grad.sum().backward()
    record("create_graph", higher_order)
    return errors


def _tolerance(case: dict) -> float:
    return 1e-11 if case.get("dtype", "float64") == "float64" else 1e-5


def _assert_close(got, want, tolerance, what, floor=1e-3):
    """Within ``tolerance`` of the largest value, plus one rounding of the tensor's own dtype per element
    (the same infinities and NaNs where the oracle has them; bfloat16 gradients are float32 values rounded once: two float32 values a rounding apart may round
    to neighbouring bfloat16 values). The largest value counts as at least 1e-3, the gradients' natural
    size here (alpha / (T N)): a gradient that is zero analytically (K = 1) comes out a rounding from zero;
    the loss and its parts count as at least 1 (a sum of cosines may cancel to near 0)."""
    ulp = torch.finfo(got.dtype).eps if got.dtype in (torch.bfloat16, torch.float16) else 0.0
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite].isnan(), want[~finite].isnan()) \
        and torch.equal(got[torch.isinf(want)], want[torch.isinf(want)]), f"{what}: {got} where {want} is expected"
    got, want = got[finite], want[finite]
    if not want.numel():
        return
    scale = max(want.abs().max().item(), floor)
    excess = ((got - want).abs() - ulp * want.abs()).max().item()
    assert excess <= tolerance * scale, f"{what}: max error {excess:.3g} beyond one rounding, scale {scale:.3g}"


_RESULTS: dict[int, list[dict]] = {}


def sharded_results(world: int, tmp_path_factory) -> list[dict]:
    """Every rank's results of the world's cases (one spawn of ``world`` processes per session)."""
    if world not in _RESULTS:
        path = str(tmp_path_factory.mktemp(f"vocab_parallel_{world}") / "results")
        _RESULTS[world] = run_ranks(_rank_results, world, path, seconds=240, what="vocabulary-parallel")
    return _RESULTS[world]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("world", sorted(CASES))
def test_sharded_loss_and_gradients_equal_the_whole_vocabulary(world, backend, tmp_path_factory):
    """Each backend in the layout (the kernels for the passes over the shard's logits) against the
    single-process reference on the same inputs (float32 for the kernels, float64 for the reference)."""
    if backend not in _backends():
        pytest.skip(f"{backend} does not run here")
    ranks = sharded_results(world, tmp_path_factory)
    for raw in CASES[world]:
        case = _case(raw, backend)
        want_values, want_grads = _run(_case(raw, backend) | {"backend": "reference"},
                                       *_inputs(case, seed=len(case["name"])))
        tolerance, starts = _tolerance(case), _starts(case)
        for rank, results in enumerate(ranks):
            values, grads = results[case["name"], backend]
            for key, want in want_values.items():
                _assert_close(values[key], want, tolerance, f"P={world} {case['name']}: rank {rank}'s {key}", floor=1.0)
            part = slice(starts[rank], starts[rank] + case["sizes"][rank])
            assert set(grads) == set(want_grads), f"P={world} {case['name']}: gradients {set(grads)}"
            for name, want in want_grads.items():
                if name != "input":
                    want = want[part]
                elif not case.get("linear"):
                    want = want[..., part]
                _assert_close(grads[name], want, tolerance, f"P={world} {case['name']}: rank {rank}'s d{name}")


@pytest.mark.parametrize("world", sorted(CASES))
def test_refusals_name_the_argument(world, tmp_path_factory):
    """Overlapping shards, ranks with different positions, a label beyond the whole vocabulary and a higher-order gradient each raise on every rank (no hang)."""
    for results in sharded_results(world, tmp_path_factory):
        errors = results["errors"]
        assert "vocab_start" in errors["overlap"] and "tile" in errors["overlap"]
        assert errors["positions"].startswith("ValueError: labels: expected the same positions")
        assert f"labels: expected values in [0, {3 * world})" in errors["labels"]
        assert errors["create_graph"].startswith("UnsupportedDifferentiationError") and \
            "create_graph" in errors["create_graph"]


def test_arguments_checked_without_a_group():
    logits, labels, embedding = torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.randn(5, 4)
    with pytest.raises(ValueError, match="vocab_start: expected None without process_group"):
        mixed_loss(logits, labels, embedding, vocab_start=0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
            mixed_loss(logits, labels, embedding, process_group=object())


def test_the_documented_torchrun_example_runs_and_agrees():
    """docs/examples/vocab_parallel_torchrun.py under ``torchrun --nproc_per_node 2``, as the page shows it."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "docs/examples/vocab_parallel_torchrun.py"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded, whole = map(float, re.search(r"loss ([\d.]+), whole vocabulary in one process ([\d.]+)",
                                          done.stdout).groups())
    assert sharded == pytest.approx(whole, rel=1e-6)
    differences = [float(x) for x in re.findall(r"(?:difference|rows) ([\d.e+-]+)", done.stdout)]
    assert len(differences) == 2 and max(differences) < 1e-6


def test_the_tp_benchmark_counts_what_the_cost_model_predicts(tmp_path, capsys):
    """bench/tp.py at a tiny size: a row per P, the sharded loss equal to one process's, and the bytes
    each collective carried equal to docs/vocab_parallel.md's count (plus the shard check's 4 integers
    per other rank)."""
    from bench import tp

    assert tp.main(["--world", "2,3", "--tokens", "24", "--vocab", "50", "--hidden", "8", "--topk", "6",
                    "--repeats", "1", "--backend", "reference", "--out-dir", str(tmp_path)]) == 0
    import json

    results = json.loads((tmp_path / f"tp-cpu-{os.cpu_count()}core.json").read_text())
    assert [row["world"] for row in results["rows"]] == [1, 2, 3]
    for row in results["rows"][1:]:
        assert row["bytes"]["all_reduce"] == row["predicted_bytes"]["all_reduce"]
        assert row["bytes"]["all_gather"] == row["predicted_bytes"]["all_gather"] + 32 * (row["world"] - 1)
        assert row["loss"] == pytest.approx(results["rows"][0]["loss"], rel=1e-5)
    assert (tmp_path / f"tp-cpu-{os.cpu_count()}core.md").read_text() == tp.table(results)


@pytest.mark.gpu
def test_triton_on_cuda_with_two_ranks_on_one_device(tmp_path):
    """The Triton kernels' passes over the shard on a GPU (two ranks share the one device of a GPU
    session; gloo), against the single-process reference on the same CUDA tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ranks = run_ranks(_gpu_rank_results, 2, str(tmp_path / "results"), seconds=240, what="CUDA vocabulary-parallel")
    for raw in GPU_CASES:
        for backend in ("reference", "triton"):
            case = _case(raw, backend)
            want_values, want_grads = _to_cpu(_run(case | {"backend": "reference"},
                                                   *_inputs(case, seed=len(case["name"]), device="cuda")))
            starts = _starts(case)
            for rank, results in enumerate(ranks):
                values, grads = results[case["name"], backend]
                what = f"cuda {backend} {case['name']}: rank {rank}"
                for key, want in want_values.items():
                    _assert_close(values[key], want, _tolerance(case), f"{what}'s {key}", floor=1.0)
                part = slice(starts[rank], starts[rank] + case["sizes"][rank])
                for name, want in want_grads.items():
                    want = want[part] if name != "input" else (want if case.get("linear") else want[..., part])
                    _assert_close(grads[name], want, _tolerance(case), f"{what}'s d{name}")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_precision_no_worse_than_naive_same_dtype(backend, tmp_path_factory):
    """test_precision's criterion in the layout (2 ranks): on float32 inputs, the sharded loss's error
    against the float64 single-process reference, in the loss and the gathered gradients, within
    4 times the naive float32 formulation's plus a floor of ulps (low T, alpha 1, peaked and flat
    rows, K = 1, 17 and the whole row)."""
    import test_precision

    if backend not in _backends():
        pytest.skip(f"{backend} does not run here")
    ranks = sharded_results(2, tmp_path_factory)
    for index, (temperature, alpha, kind, topk) in enumerate(PRECISION_CASES):
        (logits, labels, embedding), options = _precision_inputs(index)
        truth = test_precision._value_and_grads(
            lambda z, y, e: mixed_loss(z, y, e, backend="reference", **options),
            logits.double(), labels, embedding.double())
        naive = test_precision._value_and_grads(
            lambda z, y, e: test_precision.naive_mixed_loss(z, y, e, **options), logits, labels, embedding)
        shards = [results["precision"][index, backend] for results in ranks]
        ours = (shards[0][0], torch.cat([shard[1] for shard in shards], dim=1),
                torch.cat([shard[2] for shard in shards], dim=0))
        scales = test_precision._natural_scales(labels, alpha, temperature)
        for part, mine, theirs, exact, scale in zip(("loss", "d/dlogits", "d/dembedding"), ours, naive, truth, scales):
            bound = test_precision._bound(test_precision._error(theirs, exact), exact, scale, torch.float32)
            error = test_precision._error(mine, exact)
            assert error <= bound, (f"{backend} T={temperature} alpha={alpha} {kind} K={topk} {part}: error {error:.3e} "
                                    f"against float64 above {bound:.3e}")
            for other in shards[1:]:
                assert torch.equal(other[0], shards[0][0]), "every rank returns the same loss"


def test_under_torch_compile_the_layout_runs_eagerly_and_agrees(tmp_path_factory):
    """torch.compile of a step that calls the loss with process_group: the collectives break the graph
    and run eagerly; loss and gradients equal the eager call's."""
    for results in sharded_results(2, tmp_path_factory):
        (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results["compiled"]
        assert torch.allclose(compiled_loss, eager_loss, rtol=1e-6) and torch.allclose(compiled_grad, eager_grad,
                                                                                        rtol=1e-6, atol=1e-9)
