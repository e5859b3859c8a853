"""Where the Triton backend's time goes: each kernel launch and host step of one training
call, timed separately, against the device-memory bytes docs/triton_kernel.md predicts for it.

    python bench/stages.py                              # CUDA, N=8192 V=50257 H=768 K=256 bf16
    python bench/stages.py --path backward              # forward_rows then backward_rows
    TRITON_INTERPRET=1 python bench/stages.py --device cpu --tokens 8 --vocab 300 --hidden 16 --topk 8

Every kernel of ``fused_cosloss.triton_ops`` (in the module that launches it) and the host
steps of ``triton_ops/grouping.py`` are wrapped so that each launch is bracketed by CUDA
events (on CPU, the interpreter, by the clock); the table gives the median over ``--repeats`` calls of
each stage's summed time per call, its predicted bytes, and the bandwidth that implies.
The first GPU session compares these with the doc's byte count: a stage far below the
copy bandwidth is the one to look at.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fused_cosloss.options import LossOptions  # noqa: E402

KERNELS = ("row_stats_kernel", "cosine_kernel", "backward_rows_kernel", "direction_chunk_kernel",
           "embedding_grad_kernel", "selected_grad_kernel")
# the host steps of triton_ops/grouping.py, by the names the table gives them
HOST_STEPS = {"_grouped_entries": "grouped_entries", "_target_segments": "target_segments"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--path", choices=["grad-in-forward", "backward"], default="grad-in-forward",
                        help="forward_backward_rows (mixed_loss's default in training) or forward_rows + backward_rows")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--softcap", type=float, default=None,
                        help="the loss's soft-cap c (docs/spec.md, 'Loss options'); off by default")
    parser.add_argument("--all-kernels", action="store_true",
                        help="also time every other Triton kernel of fused_cosloss.triton_ops that the run launches "
                             "(no byte count for those)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    return parser.parse_args(argv)


class Clock:
    """Brackets of CUDA events (or clock readings on CPU), read once the device is done."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.spans: dict[str, list] = defaultdict(list)

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        self.spans[name].append((start, end))

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {name: sum(a.elapsed_time(b) for a, b in spans) for name, spans in self.spans.items()}
        return {name: 1e3 * sum(b - a for a, b in spans) for name, spans in self.spans.items()}


class TimedKernel:
    """``kernel[grid](...)`` as the backend calls it, each launch bracketed by the clock."""

    def __init__(self, kernel, name: str, clock_ref: list):
        self.kernel, self.name, self.clock_ref = kernel, name, clock_ref

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def timed(*args, **kwargs):
            clock = self.clock_ref[0]
            start = clock.mark()
            result = launch(*args, **kwargs)
            clock.add(self.name, start, clock.mark())
            return result
        return timed


def _timed_host(function, name: str, clock_ref: list):
    def timed(*args, **kwargs):
        clock = clock_ref[0]
        start = clock.mark()
        result = function(*args, **kwargs)
        clock.add(name, start, clock.mark())
        return result
    return timed


def kernel_sites(ops) -> dict[str, ModuleType]:
    """Every Triton kernel of the backend package (compiled or interpreted) -> the module of
    ``ops`` that defines it and launches it."""
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = JITFunction
    sites = {}
    for module in vars(ops).values():
        if not isinstance(module, ModuleType) or not module.__name__.startswith(ops.__name__ + "."):
            continue
        for name, value in vars(module).items():
            if (name.endswith("_kernel") and isinstance(value, (JITFunction, InterpretedFunction))
                    and value.fn.__module__ == module.__name__):
                sites[name] = module
    return sites


def other_kernels(ops) -> list[str]:
    """Names of every Triton kernel the backend package launches."""
    return sorted(kernel_sites(ops))


def predicted_bytes(args, chunks: int) -> dict[str, float]:
    """Device-memory bytes per stage (docs/triton_kernel.md's count; gathers at no L2 hit)."""
    n, v, h, k = args.tokens, args.vocab, args.hidden, args.topk
    b = torch.finfo(DTYPES[args.dtype]).bits // 8
    gather = n * k * h * b
    logits = n * v * b
    fused = args.path == "grad-in-forward"
    return {
        "row_stats_kernel": logits * (2 if fused else 1),
        "cosine_kernel": gather,
        "backward_rows_kernel": 2 * logits,
        "direction_chunk_kernel": gather,
        "embedding_grad_kernel": v * h * b + chunks * n * k * 16,
        # S's values, indices (int16) and summed s read; each entry's gradient a scattered write
        "selected_grad_kernel": n * k * (b + 2 + 4) + n * k * b,
    }


def run(args) -> list[dict]:
    import fused_cosloss.triton_ops as ops
    from fused_cosloss.triton_ops import grouping, tiles

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, device=device, generator=gen) * 3).to(dtype)
    embedding = torch.randn(args.vocab, args.hidden, device=device, generator=gen).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    scale = 1.0 / args.tokens
    grad_ce = torch.full((args.tokens,), (1 - args.alpha) * scale, device=device)
    grad_cos = torch.full((args.tokens,), -args.alpha * scale, device=device)
    with_cos = args.alpha > 0
    k = min(args.topk, args.vocab)

    clock_ref = [Clock(args.device)]
    sites = kernel_sites(ops)
    kernels = KERNELS + (tuple(name for name in sorted(sites) if name not in KERNELS) if args.all_kernels else ())
    # (module, attribute, the stage's name): the launchers look their kernel up in their module,
    # the backend the host steps in grouping.py, at every call
    targets = [(sites[name], name, name) for name in kernels]
    targets += [(grouping, attribute, stage) for stage, attribute in HOST_STEPS.items()]
    originals = [(module, attribute, getattr(module, attribute)) for module, attribute, _ in targets]
    # the wrappers hide the kernels' type; tiles.interpreted() asks select.py's helpers, which stay
    try:
        for (module, attribute, stage), (_, _, original) in zip(targets, originals):
            wrapped = TimedKernel(original, stage, clock_ref) if attribute.endswith("_kernel") else _timed_host(
                original, stage, clock_ref)
            setattr(module, attribute, wrapped)

        options = LossOptions(1.0, k, -100, with_cos, softcap=args.softcap)

        def call():
            if args.path == "grad-in-forward":
                return ops.forward_backward_rows(logits, labels, embedding, grad_ce, grad_cos, options,
                                                 need_logits_grad=True, need_embedding_grad=with_cos)
            saved = ops.forward_rows(logits, labels, embedding, options).saved
            return ops.backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options,
                                     need_logits_grad=True, need_embedding_grad=with_cos)

        call()  # compilation and autotuning, not timed
        per_call = defaultdict(list)
        for _ in range(args.repeats):
            clock_ref[0] = Clock(args.device)
            start = clock_ref[0].mark()
            call()
            clock_ref[0].add("total", start, clock_ref[0].mark())
            for name, ms in clock_ref[0].totals_ms().items():
                per_call[name].append(ms)
    finally:
        for module, attribute, original in originals:
            setattr(module, attribute, original)

    chunks = len(range(0, args.hidden, tiles.hidden_chunk(args.vocab, args.hidden, torch.finfo(dtype).bits // 8)))
    bytes_of = predicted_bytes(args, chunks)
    rows = []
    for name, times in per_call.items():
        ms = statistics.median(times)
        predicted = bytes_of.get(name)
        rows.append({"stage": name, "median_ms": ms, "predicted_bytes": predicted,
                     "gb_per_s": predicted / ms / 1e6 if predicted and ms > 0 else None})
    order = {name: i for i, name in enumerate(kernels + tuple(HOST_STEPS) + ("total",))}
    return sorted(rows, key=lambda row: order.get(row["stage"], len(order)))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu with TRITON_INTERPRET=1 (correctness of the script only)")
        return 2
    rows = run(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}: N={args.tokens} V={args.vocab} H={args.hidden} K={args.topk} {args.dtype} alpha={args.alpha} "
          f"path={args.path}, median of {args.repeats}")
    print(f"{'stage':<24} {'ms':>9} {'predicted MB':>13} {'GB/s':>8}")
    for row in rows:
        predicted = f"{row['predicted_bytes'] / 1e6:13.1f}" if row["predicted_bytes"] else f"{'':>13}"
        rate = f"{row['gb_per_s']:8.0f}" if row["gb_per_s"] else f"{'':>8}"
        print(f"{row['stage']:<24} {row['median_ms']:9.3f} {predicted} {rate}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "args": vars(args), "stages": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
