"""The vocabulary-parallel loss (``process_group``): time and bytes communicated per rank, next to
the single-process loss on the whole vocabulary, in one run.

    python bench/tp.py                                  # CPU (gloo): P = 2, N = 1024, V = 32000
    python bench/tp.py --world 2,4 --device cuda --backend reference,triton   # P GPUs (nccl), bfloat16

Each P runs in P fresh processes (``torch.multiprocessing``), every one with the same inputs and
its contiguous shard of the vocabulary; rank 0 reports the median of forward + backward (a
barrier before each repeat) and what each collective carried (the tensors handed to
``all_reduce`` and the ones ``all_gather`` received from the other ranks), beside the prediction
of docs/vocab_parallel.md. The single-process row runs the same call without ``process_group``
in one more process with the same threads per process. Each backend of ``--backend`` has its rows
(the kernels do the passes over the shard's logits). Results: a table on stdout and, unless
``--no-save``, ``tp-<slug>.json`` and ``.md`` in ``--out-dir`` (the page generated from the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="2", help="comma-separated process counts P (default 2)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--backend", default="reference,native",
                        help="comma-separated backends, each with its own rows (default reference,native)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.worlds = [int(p) for p in args.world.split(",")]
    args.backends = [name for name in args.backend.split(",") if name]
    if any(p < 1 for p in args.worlds):
        parser.error(f"--world: expected process counts >= 1, got {args.world}")
    return args


def inputs(args, device):
    """The whole tensors, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    logits = (torch.randn(args.tokens, args.vocab, generator=gen) * 3).to(dtype)
    embedding = torch.randn(args.vocab, args.hidden, generator=gen).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    return logits.to(device), labels.to(device), embedding.to(device)


def predicted_bytes(args, world: int) -> dict:
    """Per rank, docs/vocab_parallel.md's count: what the reductions carry (float32 compute values) and
    what the candidates' all-gather receives from the other ranks (a float32 value and an int64 index).
    The reductions: the row maximum, the sum of exponentials, the target logit and the normaliser over S
    (n each), mu's partial sums and e (n H each), and in the backward the normaliser's gradient (s-bar, n)."""
    n, k, h = args.tokens, min(args.topk, args.vocab), args.hidden
    return {"all_reduce": 4 * (5 * n + 2 * n * h), "all_gather": (world - 1) * n * k * 12}


class ByteCount:
    """Wraps ``all_reduce`` and ``all_gather`` of torch.distributed to add up what they carry."""

    def __init__(self):
        self.bytes = {"all_reduce": 0, "all_gather": 0}
        self.counting = False
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *a, **kw):
            if self.counting:
                self.bytes["all_reduce"] += tensor.numel() * tensor.element_size()
            return self._reduce(tensor, *a, **kw)

        def all_gather(outputs, tensor, *a, **kw):
            if self.counting:
                self.bytes["all_gather"] += (len(outputs) - 1) * tensor.numel() * tensor.element_size()
            return self._gather(outputs, tensor, *a, **kw)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _time_calls(call, repeats, device, barrier=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if barrier:
            barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _worker(rank, world, port, args, backend, path):
    from fused_cosloss import mixed_loss

    torch.set_num_threads(args.threads)
    try:
        device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
        if args.device == "cuda":
            torch.cuda.set_device(device)
        counter = ByteCount() if world > 1 else None
        if world > 1:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        logits, labels, embedding = inputs(args, device)
        if world > 1:
            part = torch.tensor_split(torch.arange(args.vocab), world)[rank]
            logits = logits[:, part[0]:part[-1] + 1].contiguous()
            embedding = embedding[part[0]:part[-1] + 1].contiguous()
        parallel = {"process_group": dist.group.WORLD} if world > 1 else {}
        logits.requires_grad_()
        embedding.requires_grad_()

        def call():
            logits.grad = embedding.grad = None
            loss = mixed_loss(logits, labels, embedding, alpha=args.alpha, topk=args.topk, backend=backend,
                              **parallel)
            loss.backward()
            return loss

        loss = call()  # warm-up, and the count of one call's bytes
        if counter:
            counter.counting = True
            call()
            counter.counting = False
        times = _time_calls(call, args.repeats, device, dist.barrier if world > 1 else None)
        if rank == 0:
            record = {"world": world, "backend": backend, "median_ms": statistics.median(times), "times_ms": times,
                      "loss": float(loss.detach()), "bytes": counter.bytes if counter else None,
                      "predicted_bytes": predicted_bytes(args, world) if world > 1 else None,
                      "vocab_per_rank": logits.shape[1]}
            with open(path, "w") as handle:
                json.dump(record, handle)
        if world > 1:
            dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(args, world: int, backend: str, directory: str) -> dict:
    path = os.path.join(directory, f"world{world}-{backend}.json")
    mp.spawn(_worker, args=(world, _free_port(), args, backend, path), nprocs=world, join=True)
    with open(path) as handle:
        return json.load(handle)


def machine(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu-{os.cpu_count()}core"


def table(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# The vocabulary-parallel loss: {meta['machine']}",
             "",
             f"Generated by `{meta['command']}` on {meta['date']} (torch {meta['torch']}); do not edit by hand.",
             f"N = {meta['tokens']}, V = {meta['vocab']}, H = {meta['hidden']}, K = {meta['topk']}, {meta['dtype']}, "
             f"alpha = {meta['alpha']}, {meta['threads']} thread(s) per process, median of "
             f"{meta['repeats']} forward + backward; \"vs one process\": against the same backend's single-process row.",
             "",
             "| backend | P | V per rank | median ms (rank 0) | vs one process | all-reduce MB per rank (predicted) | "
             "all-gather MB received per rank (predicted) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        single = next(other for other in results["rows"] if other["world"] == 1 and other["backend"] == row["backend"])
        sent = row["bytes"] or {"all_reduce": 0, "all_gather": 0}
        predicted = row["predicted_bytes"] or {"all_reduce": 0, "all_gather": 0}
        lines.append(f"| {row['backend']} | {row['world']} | {row['vocab_per_rank']} | {row['median_ms']:.1f} | "
                     f"{row['median_ms'] / single['median_ms']:.2f}x | {sent['all_reduce'] / 1e6:.2f} "
                     f"({predicted['all_reduce'] / 1e6:.2f}) | {sent['all_gather'] / 1e6:.2f} "
                     f"({predicted['all_gather'] / 1e6:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import tempfile

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.worlds):
        print(f"--world {args.world}: needs {max(args.worlds)} CUDA devices, found {torch.cuda.device_count()}")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for backend in args.backends:
            for world in sorted(set([1] + args.worlds)):
                print(f"{backend}, P = {world} ...", flush=True)
                rows.append(run_world(args, world, backend, directory))
    command = "python bench/tp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {key: getattr(args, key) for key in ("tokens", "vocab", "hidden", "topk", "alpha", "dtype", "threads",
                                                "repeats", "device", "backends")}
    meta.update(machine=machine(args), command=command.strip(), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    results = {"meta": meta, "rows": rows}
    text = table(results)
    print(text)
    single = rows[0]["loss"]
    for row in rows[1:]:
        if abs(row["loss"] - single) > 1e-4 * max(1.0, abs(single)):
            print(f"{row['backend']}, P = {row['world']}: loss {row['loss']} differs from the reference's {single}")
            return 1
    if not args.no_save:
        slug = f"tp-{meta['machine'].replace(' ', '-').lower()}"
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"{slug}.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        with open(os.path.join(args.out_dir, f"{slug}.md"), "w") as handle:
            handle.write(text)
        print(f"wrote {os.path.join(args.out_dir, slug)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
