"""Step ``checks`` of the GPU session: the Triton backend's correctness on the device, check by check.

    python bench/gpu_checks.py --device cuda --out checks.jsonl          # every unit, several processes at once
    python bench/gpu_checks.py --device cuda --unit memory               # one unit, records on stdout
    TRITON_INTERPRET=1 python bench/gpu_checks.py --device cpu --dry --out checks.jsonl   # tiny shapes

Each check records what it measured (the error, the rows that differ, the bytes) against its
target, pass or fail, and a failing or crashing check does not stop the others. The checks
come in units, each run in its own process (``--unit``), a few at a time: a unit that hangs
or crashes costs only itself, the units compile their kernels in parallel, and a unit still
running at ``--time-limit`` is stopped and reported with the check it was in. Every record is
appended to ``--out`` as a JSON line the moment it exists.

The units: the top-k selection against a stable sort on rows with ties (bf16 and fp32, K in
{1, 256, 1024}, V in {50257, 151936, 262144}); agreement with the reference at the benchmark
shape; N * V > 2**31 (64-bit offsets); bitwise determinism; the extra memory by the caching
allocator (at most 5 % of the logits); ``inplace_grad``; the fused-linear path. ``--dry``
takes tiny shapes (on CPU under the Triton interpreter: the plumbing, not the numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fused_cosloss.options import LossOptions  # noqa: E402

IGNORE_INDEX = -100
MEMORY_SHARE = 0.05         # issue 3: peak extra memory at most 5 % of the logits' bytes
OFFSET_TOLERANCE = 1e-2     # tests/test_triton.py's for the rows past 2**31 elements (bfloat16)


@dataclass(frozen=True)
class Shapes:
    select_vocabs: tuple[int, ...]
    select_ks: tuple[int, ...]
    select_rows: dict
    select_hidden: int
    bench: tuple[int, int, int, int]        # N, V, H, K
    large: tuple[int, int, int, int]        # N * V > 2**31 on the GPU
    segments: tuple[int, int, int, int]     # a small vocabulary shared by many rows: long segments
    linear: tuple[int, int, int, int]
    linear_fp32_tokens: int


GPU = Shapes(select_vocabs=(50257, 151936, 262144), select_ks=(1, 256, 1024),
             select_rows={50257: 2048, 151936: 1024, 262144: 512}, select_hidden=768,
             bench=(8192, 50257, 768, 256), large=(65536, 50257, 768, 256), segments=(4096, 2000, 256, 256),
             linear=(16384, 50257, 768, 256), linear_fp32_tokens=4096)
DRY = Shapes(select_vocabs=(256,), select_ks=(1, 8), select_rows={256: 16}, select_hidden=16,
             bench=(16, 256, 16, 8), large=(32, 256, 16, 8), segments=(32, 40, 16, 8), linear=(16, 256, 16, 8),
             linear_fp32_tokens=16)


def unit_names(shapes: Shapes) -> list[str]:
    """Every unit, in the order they start: the benchmark's own dtype and vocabulary first."""
    selection = [f"selection-{dtype}-V{vocab}" for vocab in shapes.select_vocabs for dtype in ("bfloat16", "float32")]
    return [selection[0], "agreement", "large-offsets", "determinism", "memory", "inplace", "fused-linear",
            *selection[1:]]


# --------------------------------------------------------------------------- recording

class Recorder:
    """Emits one record when a check starts and one when it ends; an exception inside a check
    is its result (status error), never the end of the unit."""

    def __init__(self, unit: str, device: str, emit):
        self.unit, self.device, self.emit = unit, device, emit

    @contextlib.contextmanager
    def check(self, name: str, target: str):
        base = {"kind": "check", "unit": self.unit, "name": name, "target": target}
        self.emit({**base, "status": "started"})
        result: dict = {}
        started = time.perf_counter()
        status, detail = None, None
        try:
            yield result
            status = "skipped" if result.get("skipped") else "pass" if result.get("passed") else "fail"
            detail = result.get("skipped")
        except Exception as error:  # noqa: BLE001 - a failing check is reported, the others still run
            status = "error"
            detail = f"{type(error).__name__}: {str(error)[:500]}\n{traceback.format_exc()[-1500:]}"
        finally:
            result.pop("skipped", None)
            result.pop("passed", None)
            try:
                _release(self.device)
            except Exception as error:  # noqa: BLE001 - e.g. a kernel's illegal access surfacing at the sync
                status = "error"
                detail = (detail or "") + f"\nafter the check: {type(error).__name__}: {str(error)[:500]}"
            self.emit({**base, "status": status, "wall_s": round(time.perf_counter() - started, 2),
                       "text": result.pop("text", None), "measured": result or None, "detail": detail})


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _rel_err(got, want, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor), in float64; inf on a non-finite result."""
    got, want = got.detach().double(), want.detach().double()
    if not bool(got.isfinite().all()) and bool(want.isfinite().all()):
        return math.inf
    finite = want.isfinite()
    diff = float((got[finite] - want[finite]).abs().max()) if bool(finite.any()) else 0.0
    scale = max(float(want[finite].abs().max()) if bool(finite.any()) else 0.0, floor)
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------- the units

def _dtype(name: str):
    import torch
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def tied_rows(n: int, vocab: int, dtype, device: str, gen):
    """Logits whose rows cycle through four kinds: 0 plain normal (bf16 rounding ties some), 1
    values on a 1/16 grid (ties of ~20 at the K-th value, few candidates: the main path), 2 integers
    in [-2, 2] (thousands of ties: more candidates than the scratch, the whole-row fallback), 3 98 %
    -inf (K can exceed the finite entries). -0.0 is made +0.0, on which every sort agrees."""
    import torch
    base = torch.randn(n, vocab, device=device, generator=gen) * 2.0
    kind = torch.arange(n, device=device) % 4
    grid = torch.round(base * 16) / 16
    ints = torch.randint(-2, 3, (n, vocab), device=device, generator=gen).float()
    masked = base.masked_fill(torch.rand(n, vocab, device=device, generator=gen) < 0.98, float("-inf"))
    rows = torch.where((kind == 0)[:, None], base, torch.where((kind == 1)[:, None], grid,
                                                               torch.where((kind == 2)[:, None], ints, masked)))
    return (rows.to(dtype) + 0.0), kind


def selection_unit(rec: Recorder, shapes: Shapes, dtype_name: str, vocab: int) -> None:
    import torch

    import fused_cosloss.triton_ops as ops
    device, dtype = rec.device, _dtype(dtype_name)
    n, hidden = shapes.select_rows[vocab], shapes.select_hidden
    gen = torch.Generator(device=device).manual_seed(vocab * 7 + (dtype == torch.float32))
    logits, kind = tied_rows(n, vocab, dtype, device, gen)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    embedding = (torch.randn(vocab, hidden, device=device, generator=gen) * 0.02).to(dtype)
    # docs/spec.md's S: the K largest, ties to the lower index = the first K of a stable descending sort
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :max(shapes.select_ks)]
    kinds = ["normal", "grid-1/16", "integers", "98%-inf"]
    for k in shapes.select_ks:
        target = "S equal to the first K of a stable descending sort on every row; S's values exact"
        with rec.check(f"selection {dtype_name} V={vocab} K={k}", target) as result:
            saved = ops.forward_rows(logits, labels, embedding, LossOptions(1.0, k, IGNORE_INDEX, True)).saved
            s_idx, s_val = saved.s_idx, saved.s_val
            idx = s_idx.long() & 0xFFFF if s_idx.dtype == torch.int16 else s_idx.long()
            want = order[:, :k].sort(dim=1).values
            got, position = idx.sort(dim=1)
            wrong = (got != want).any(dim=1)
            values_exact = bool(torch.equal(s_val.gather(1, position), logits.gather(1, got.clamp(0, vocab - 1))))
            by_kind = {kinds[i]: int(wrong[kind == i].sum()) for i in range(4)}
            result.update(rows=n, rows_wrong=int(wrong.sum()), rows_wrong_by_kind=by_kind, values_exact=values_exact,
                          index_dtype=str(s_idx.dtype).replace("torch.", ""))
            result["passed"] = not bool(wrong.any()) and values_exact
            result["text"] = (f"{int(wrong.sum())} of {n} rows differ ({', '.join(f'{k_}: {v}' for k_, v in by_kind.items())}); "
                              f"values {'exact' if values_exact else 'DIFFER'}")


def _bench_config(device: str, dtype, shape, alpha: float = 0.5):
    from bench.impls import Config
    n, vocab, hidden, topk = shape
    return Config(device=device, dtype=dtype, vocab=vocab, hidden=hidden, topk=topk, alpha=alpha, temperature=1.0)


def _against_reference(rec: Recorder, impl_name: str, dtype_name: str, shape, label: str) -> None:
    """An implementation of bench/impls.py against its reference, as the benchmark checks it (bench/check.py)."""
    from bench.check import compare, loss_and_grads
    from bench.impls import IMPLS, reference_for
    from bench.inputs import make_embedding, make_set
    impl = IMPLS[impl_name]
    dtype = _dtype(dtype_name)
    cfg = _bench_config(rec.device, dtype, shape)
    n, vocab, hidden, topk = shape
    with rec.check(f"{label}: {impl_name} {dtype_name} N={n} V={vocab} H={hidden} K={topk}",
                   "loss and gradients within bench/check.py's tolerances of the reference") as result:
        inputs = make_set(impl.kind, n, vocab, hidden, topk, dtype, rec.device, seed=1, index=0)
        inputs["embedding"] = make_embedding(vocab, hidden, dtype, rec.device, seed=1)
        leaves = impl.leaves(cfg)
        ref_loss, ref_grads = loss_and_grads(reference_for(impl, cfg), inputs, leaves)
        loss, grads = loss_and_grads(impl.build(cfg), inputs, leaves)
        outcome = compare(loss, grads, ref_loss, ref_grads, dtype, impl.tolerance_scale)
        result["passed"] = outcome.pop("passed")
        result.update(outcome)
        result["text"] = (f"loss rel {outcome['loss_rel_err']:.1e}, "
                          + ", ".join(f"d{name} {err:.1e}" for name, err in outcome["grad_err"].items())
                          + f" (tolerances {outcome['tol_loss']:.0e} / {outcome['tol_grad']:.0e})")


def agreement_unit(rec: Recorder, shapes: Shapes) -> None:
    for impl_name, dtype_name in (("triton", "bfloat16"), ("ce-triton", "bfloat16"), ("triton", "float32")):
        _against_reference(rec, impl_name, dtype_name, shapes.bench, "benchmark shape")


def _offset_rows(n: int, vocab: int) -> list[int]:
    """Rows to compare element by element: the first, those around element 2**31, the last."""
    boundary = (1 << 31) // vocab
    rows = list(range(4)) + list(range(boundary - 4, boundary + 4)) + list(range(n - 8, n))
    return sorted({row for row in rows if 0 <= row < n})


def large_offsets_unit(rec: Recorder, shapes: Shapes) -> None:
    """N * V > 2**31 elements: per-row losses of every row (chunk by chunk against the reference) and
    the gradient rows at the start, around element 2**31 and at the end, by both gradient paths."""
    import torch

    from fused_cosloss import mixed_loss
    device = rec.device
    n, vocab, hidden, topk = shapes.large
    dry_note = "" if n * vocab > 2**31 else f" (dry: N*V = {n * vocab}, not > 2**31)"
    target = f"relative error <= {OFFSET_TOLERANCE:g} (tests/test_triton.py's), zero gradient outside the rows asked"
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 3 * n * vocab * 2 + (4 << 30):
            with rec.check(f"N*V > 2**31: N={n} V={vocab}", target) as result:
                result["skipped"] = f"{free / 2**30:.0f} GiB free, too little for two {n * vocab * 2 / 1e9:.1f} GB tensors"
            return
    gen = torch.Generator(device=device).manual_seed(31)
    logits = torch.empty(n, vocab, device=device, dtype=torch.bfloat16)
    for start in range(0, n, 4096):
        logits[start:start + 4096].copy_(torch.randn(min(4096, n - start), vocab, device=device, generator=gen) * 3)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    labels[::97] = IGNORE_INDEX
    embedding = (torch.randn(vocab, hidden, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    rows = _offset_rows(n, vocab)
    options = dict(topk=topk, ignore_index=IGNORE_INDEX)

    ref_rows = torch.cat([mixed_loss(logits[s:s + 4096], labels[s:s + 4096], embedding, backend="reference",
                                     reduction="none", **options) for s in range(0, n, 4096)])
    ref_logits = logits[rows].clone().requires_grad_(True)
    mixed_loss(ref_logits, labels[rows], embedding, backend="reference", reduction="none", **options).sum().backward()
    ref_grad = ref_logits.grad

    with rec.check(f"N*V > 2**31, per-row loss and backward: N={n} V={vocab}{dry_note}", target) as result:
        logits.requires_grad_(True)
        got_rows = mixed_loss(logits, labels, embedding, backend="triton", reduction="none", **options)
        weight = torch.zeros(n, device=device)
        weight[rows] = 1.0
        (got_rows * weight).sum().backward()
        loss_err = _rel_err(got_rows, ref_rows, floor=1.0)
        grad_err = _rel_err(logits.grad[rows], ref_grad)
        outside = int(torch.count_nonzero(logits.grad)) - int(torch.count_nonzero(logits.grad[rows]))
        result.update(loss_rows_err=loss_err, grad_rows_err=grad_err, nonzero_outside=outside, rows_compared=rows)
        result["passed"] = loss_err <= OFFSET_TOLERANCE and grad_err <= OFFSET_TOLERANCE and outside == 0
        result["text"] = (f"every row's loss {loss_err:.1e}, gradient of {len(rows)} rows {grad_err:.1e}, "
                          f"{outside} nonzero gradient elements outside them")
        logits.grad = None
        del got_rows

    with rec.check(f"N*V > 2**31, gradient in the forward (sum): N={n} V={vocab}{dry_note}", target) as result:
        logits.grad = None
        loss = mixed_loss(logits, labels, embedding, backend="triton", reduction="sum", **options)
        loss.backward()
        want = float(ref_rows.double().sum())
        loss_err = abs(float(loss.detach()) - want) / max(abs(want), 1.0)
        grad_err = _rel_err(logits.grad[rows], ref_grad)
        result.update(loss_sum_err=loss_err, grad_rows_err=grad_err, rows_compared=rows)
        result["passed"] = loss_err <= OFFSET_TOLERANCE and grad_err <= OFFSET_TOLERANCE
        result["text"] = f"summed loss {loss_err:.1e}, gradient of {len(rows)} rows {grad_err:.1e}"
        logits.grad = None


def _loss_and_grads(logits, labels, embedding, **options):
    """(loss, d logits, d embedding) of mixed_loss on fresh leaves."""
    from fused_cosloss import mixed_loss
    z = logits.detach().clone().requires_grad_(True)
    table = embedding.detach().clone().requires_grad_(True)
    loss = mixed_loss(z, labels, table, backend="triton", ignore_index=IGNORE_INDEX, **options)
    loss.backward()
    return loss.detach(), z.grad, table.grad


def _bench_inputs(device: str, shape, dtype, seed: int = 3):
    from bench.inputs import make_embedding, make_set
    n, vocab, hidden, topk = shape
    inputs = make_set("logits", n, vocab, hidden, topk, dtype, device, seed=seed, index=0)
    return inputs["logits"], inputs["labels"], make_embedding(vocab, hidden, dtype, device, seed=seed)


def determinism_unit(rec: Recorder, shapes: Shapes) -> None:
    import torch
    n, vocab, hidden, topk = shapes.segments
    gen = torch.Generator(device=rec.device).manual_seed(5)
    segments = ((torch.randn(n, vocab, device=rec.device, generator=gen) * 2).to(torch.bfloat16),
                torch.randint(0, vocab, (n,), device=rec.device, generator=gen),
                torch.randn(vocab, hidden, device=rec.device, generator=gen).to(torch.bfloat16))
    segments[1][::4] = IGNORE_INDEX
    cases = [("long segments", shapes.segments, segments, True), ("long segments", shapes.segments, segments, False),
             ("benchmark shape", shapes.bench, None, True)]
    for label, shape, inputs, in_forward in cases:
        n, vocab, hidden, topk = shape
        path = "gradient in the forward" if in_forward else "backward"
        with rec.check(f"bitwise determinism, {label} ({path}): N={n} V={vocab} H={hidden} K={topk} bf16",
                       "the same inputs twice give bitwise the same loss and gradients") as result:
            logits, labels, embedding = inputs or _bench_inputs(rec.device, shape, torch.bfloat16)
            first = _loss_and_grads(logits, labels, embedding, topk=topk, grad_in_forward=in_forward)
            second = _loss_and_grads(logits, labels, embedding, topk=topk, grad_in_forward=in_forward)
            equal = {name: bool(torch.equal(a, b)) for name, a, b in zip(("loss", "dlogits", "dembedding"), first, second)}
            diffs = {name: float((a.float() - b.float()).abs().max())
                     for name, a, b in zip(("loss", "dlogits", "dembedding"), first, second)}
            result.update(bitwise_equal=equal, max_abs_diff=diffs)
            result["passed"] = all(equal.values())
            result["text"] = ", ".join(f"{name} {'equal' if same else f'DIFFERS by {diffs[name]:.1e}'}"
                                       for name, same in equal.items())


def memory_unit(rec: Recorder, shapes: Shapes) -> None:
    """Peak memory above the inputs, less the gradients, of a forward and backward (bench/measure.py:
    the caching allocator's peak on CUDA, the resident set on CPU)."""
    import torch

    from bench import measure
    from fused_cosloss import mixed_loss
    n, vocab, hidden, topk = shapes.bench
    logits_bytes = n * vocab * 2
    for in_forward, inplace in ((True, False), (False, False), (True, True)):
        name = (f"extra memory, {'gradient in the forward' if in_forward else 'backward'}"
                f"{', inplace_grad' if inplace else ''}: N={n} V={vocab} H={hidden} K={topk} bf16")
        with rec.check(name, f"at most {MEMORY_SHARE:.0%} of the logits' {logits_bytes / 1e6:.3g} MB") as result:
            if rec.device == "cpu" and measure.cpu_peak_supported() is not None:
                result["skipped"] = measure.cpu_peak_supported()
                continue
            pristine, labels, embedding = _bench_inputs(rec.device, shapes.bench, torch.bfloat16)
            logits = pristine.clone().requires_grad_(True)
            embedding.requires_grad_(True)

            def prepare():
                logits.grad = embedding.grad = None
                if inplace:
                    with torch.no_grad():
                        logits.copy_(pristine)

            def run():
                mixed_loss(logits, labels, embedding, topk=topk, ignore_index=IGNORE_INDEX, backend="triton",
                           grad_in_forward=in_forward, inplace_grad=inplace).backward()

            prepare()
            run()                               # compilation and first allocations, not measured
            peak, _ = measure.peak_bytes(rec.device, prepare, run)
            over_logits = logits.grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
            grads = embedding.grad.nbytes + (0 if over_logits else logits.grad.nbytes)
            extra = peak - grads
            result.update(peak_bytes=peak, gradient_bytes=grads, extra_bytes=extra, share=extra / logits_bytes,
                          gradient_over_logits=over_logits)
            result["passed"] = extra <= MEMORY_SHARE * logits_bytes
            result["text"] = f"{extra / 1e6:.1f} MB = {extra / logits_bytes:.2%} of the logits"


def inplace_unit(rec: Recorder, shapes: Shapes) -> None:
    """inplace_grad=True on a model's (non-leaf) logits: their storage holds the gradient, bitwise the
    ordinary one (tests/test_inplace.py at the benchmark shape)."""
    import torch

    from fused_cosloss import mixed_loss
    n, vocab, hidden, topk = shapes.bench
    logits, labels, embedding = _bench_inputs(rec.device, shapes.bench, torch.bfloat16)
    for in_forward in (True, False):
        path = "gradient in the forward" if in_forward else "backward"
        with rec.check(f"inplace_grad ({path}): N={n} V={vocab} H={hidden} K={topk} bf16",
                       "the logits' storage holds their gradient, bitwise the one without inplace_grad") as result:
            grads = {}
            for inplace in (False, True):
                base = logits.detach().clone().requires_grad_(True)
                table = embedding.detach().clone().requires_grad_(True)
                z = base * 1
                mixed_loss(z, labels, table, topk=topk, ignore_index=IGNORE_INDEX, backend="triton",
                           grad_in_forward=in_forward, inplace_grad=inplace).backward()
                grads[inplace] = (z.detach(), base.grad, table.grad)
                del base, table, z
            storage, dlogits, dembedding = grads[True]
            _, dlogits_ref, dembedding_ref = grads[False]
            equal = {"dlogits": bool(torch.equal(dlogits, dlogits_ref)),
                     "storage holds the gradient": bool(torch.equal(storage, dlogits_ref)),
                     "dembedding": bool(torch.equal(dembedding, dembedding_ref))}
            result.update(bitwise_equal=equal, dlogits_err=_rel_err(dlogits, dlogits_ref),
                          dembedding_err=_rel_err(dembedding, dembedding_ref))
            result["passed"] = all(equal.values())
            result["text"] = ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in equal.items())
            del grads, storage, dlogits, dembedding, dlogits_ref, dembedding_ref


def fused_linear_unit(rec: Recorder, shapes: Shapes) -> None:
    n, vocab, hidden, topk = shapes.linear
    for impl_name in ("linear-triton", "ce-linear-triton"):
        _against_reference(rec, impl_name, "bfloat16", shapes.linear, "fused-linear")
    _against_reference(rec, "linear-triton", "float32", (shapes.linear_fp32_tokens, vocab, hidden, topk), "fused-linear")


def run_unit(name: str, shapes: Shapes, rec: Recorder) -> None:
    if name.startswith("selection-"):
        _, dtype_name, vocab = name.split("-")
        return selection_unit(rec, shapes, dtype_name, int(vocab[1:]))
    units = {"agreement": agreement_unit, "large-offsets": large_offsets_unit, "determinism": determinism_unit,
             "memory": memory_unit, "inplace": inplace_unit, "fused-linear": fused_linear_unit}
    return units[name](rec, shapes)


# --------------------------------------------------------------------------- running the units

def groups(names: list[str], jobs: int, dry: bool) -> list[list[str]]:
    """The units each process runs: one each on the GPU (a hang or crash costs one unit; kernels
    compile in parallel); in the dry run ``jobs`` processes share them, since starting a process
    (torch, triton) costs more there than a tiny unit."""
    if not dry:
        return [[name] for name in names]
    return [names[i::jobs] for i in range(jobs) if names[i::jobs]]


class Runner:
    """Starts each group of units in its own process, ``jobs`` at a time, and appends their records
    to ``out``."""

    def __init__(self, out_path: str, device: str, dry: bool, jobs: int, time_limit: float, threads: int):
        self.out_path, self.device, self.dry = out_path, device, dry
        self.jobs, self.threads = jobs, threads
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        with self.lock, open(self.out_path, "a") as out:
            out.write(json.dumps(record) + "\n")

    def start(self, name: str):
        """``name``: the group's units, comma-separated."""
        argv = [sys.executable, os.path.abspath(__file__), "--unit", name, "--device", self.device,
                "--threads", str(self.threads), *(["--dry"] if self.dry else [])]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
        state = {"open": None, "started": time.monotonic()}
        reader = threading.Thread(target=self.pump, args=(proc, name, state), daemon=True)
        reader.start()
        self.write({"kind": "unit", "unit": name, "status": "started"})
        return proc, reader, state

    def pump(self, proc, name: str, state: dict) -> None:
        for line in proc.stdout:
            if not line.startswith("@@"):
                print(f"[{name}] {line}", end="", file=sys.stderr, flush=True)
                continue
            try:
                record = json.loads(line[2:])
            except ValueError:
                continue
            state["open"] = record["name"] if record.get("status") == "started" else None
            self.write(record)

    def finish(self, name: str, proc, reader, state: dict, killed: bool) -> None:
        reader.join(timeout=5)
        wall = round(time.monotonic() - state["started"], 1)
        record = {"kind": "unit", "unit": name, "wall_s": wall, "rc": proc.returncode}
        if killed:
            record.update(status="killed", detail=f"still running at the step's time limit ({self.time_limit:.0f} s)"
                          + (f", in: {state['open']}" if state["open"] else ""))
        elif proc.returncode != 0:
            record.update(status="crashed", detail=f"exit status {proc.returncode}"
                          + (f", in: {state['open']}" if state["open"] else ""))
        else:
            record["status"] = "done"
        self.write(record)

    def run(self, names: list[str]) -> int:
        pending, running = [",".join(group) for group in groups(names, self.jobs, self.dry)], {}
        while pending or running:
            while pending and len(running) < self.jobs and time.monotonic() < self.deadline:
                name = pending.pop(0)
                running[name] = self.start(name)
            for name, (proc, reader, state) in list(running.items()):
                if proc.poll() is not None:
                    self.finish(name, proc, reader, state, killed=False)
                    del running[name]
            if time.monotonic() >= self.deadline:
                for name, (proc, reader, state) in running.items():
                    proc.kill()
                    proc.wait()
                    self.finish(name, proc, reader, state, killed=True)
                for name in pending:
                    self.write({"kind": "unit", "unit": name, "status": "not run", "detail": "no time left"})
                return 1
            time.sleep(0.1)
        return 0


def unit_main(names: list[str], device: str, dry: bool, threads: int) -> int:
    import torch
    if threads:
        torch.set_num_threads(threads)

    def emit(record: dict) -> None:
        print("@@" + json.dumps({**record, "dry": dry}, default=str), flush=True)

    for name in names:
        rec = Recorder(name, device, emit)
        if device == "cuda" and not torch.cuda.is_available():
            with rec.check(f"{name}: CUDA", "torch sees a CUDA device"):
                raise RuntimeError("torch sees no CUDA device")
            continue
        try:
            run_unit(name, DRY if dry else GPU, rec)
        except Exception as error:  # noqa: BLE001 - outside any check (its inputs, its reference): the next unit
            emit({"kind": "check", "unit": name, "name": f"{name}: preparing its inputs", "status": "error",
                  "target": "-", "detail": f"{type(error).__name__}: {str(error)[:500]}\n{traceback.format_exc()[-1500:]}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry", action="store_true", help="tiny shapes (CPU, the Triton interpreter)")
    parser.add_argument("--unit", default=None, help="run these units (comma-separated) in this process, "
                                                     "records on stdout")
    parser.add_argument("--out", default=None, help="append every unit's records here (JSON lines)")
    parser.add_argument("--jobs", type=int, default=None, help="units at once (GPU: up to 8, dry: 2)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds; units still running are stopped")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per unit")
    args = parser.parse_args(argv)
    shapes = DRY if args.dry else GPU
    if args.unit is not None:
        names = args.unit.split(",")
        unknown = [name for name in names if name not in unit_names(shapes)]
        if unknown:
            parser.error(f"--unit: unknown {unknown}; the units are {unit_names(shapes)}")
        return unit_main(names, args.device, args.dry, args.threads or 0)
    if args.out is None:
        parser.error("--out is needed unless --unit is given")
    cores = os.cpu_count() or 2
    jobs = args.jobs or (2 if args.dry else max(1, min(8, cores // 2)))
    threads = args.threads or max(1, cores // jobs)
    runner = Runner(args.out, args.device, args.dry, jobs, args.time_limit, threads)
    code = runner.run(unit_names(shapes))
    print(f"checks: {len(unit_names(shapes))} units, {jobs} at a time; records in {args.out}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
