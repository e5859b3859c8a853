"""Step ``device`` of the GPU session: the machine, the versions, and the two rates the floor is made of.

    python bench/gpu_device.py --device cuda --json device.json      # the benchmark shape
    TRITON_INTERPRET=1 python bench/gpu_device.py --device cpu --tokens 32 --vocab 1000 --hidden 32 --topk 8 --json d.json

The floor of issue 3 at the benchmark shape (N = 8192, V = 50257, H = 768, K = 256, bf16,
forward+backward) is one read and one write of the logits at the copy bandwidth, plus the two
K x H gathers per row at the ``embedding_bag`` rate, both measured here: the copy as bench/run.py
measures it (bench/measure.py, bytes read + written), the gather as ``F.embedding_bag`` of the
top-K rows (indices and softmax weights of the benchmark's own logits) in the logits' dtype,
the L2 cache flushed before each call, the best of ``--repeats``. The JSON is rewritten after
each measurement, so a hang keeps what came before it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import measure  # noqa: E402
from bench.inputs import make_embedding, make_set  # noqa: E402
from bench.worker import DTYPES, machine  # noqa: E402

PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "numpy", "pytest", "pytest-xdist")


def versions() -> dict:
    """Python, CUDA and the installed version of every package the session uses (None: not installed)."""
    found = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def commit() -> dict:
    """The commit measured: from git where the checkout has it, else from .whl/commit.txt
    (written by ``bash bench/gpu_session.sh wheels`` before the device call: the device's copy of
    the tree has no .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
            return {"commit": head.stdout.strip(), "modified_files": len(dirty.stdout.splitlines()), "from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(os.path.join(ROOT, ".whl", "commit.txt")) as handle:
            fields = dict(line.split("=", 1) for line in handle.read().splitlines() if "=" in line)
        return {"commit": fields.get("commit"), "modified_files": int(fields.get("modified_files", 0)),
                "from": ".whl/commit.txt", "written": fields.get("date")}
    except (OSError, ValueError):
        return {"commit": None, "from": "unknown (no git, no .whl/commit.txt)"}


def nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                              "temperature.gpu,power.draw", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gather_rate(device: str, tokens: int, vocab: int, hidden: int, topk: int, dtype: torch.dtype,
                repeats: int) -> dict:
    """Bytes of embedding rows per second that ``F.embedding_bag`` gathers at this shape."""
    inputs = make_set("logits", tokens, vocab, hidden, topk, dtype, device, seed=0, index=0)
    top, idx = inputs.pop("logits").topk(topk, dim=-1)
    table = make_embedding(vocab, hidden, dtype, device, seed=0)
    weights = torch.softmax(top.float(), dim=-1).to(dtype)
    del top
    timer = measure.Timer(device)

    def bag():
        return F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")

    bag()
    measure.synchronize(device)
    best_ms = min(timer(lambda: None, bag) for _ in range(repeats))
    nbytes = tokens * topk * hidden * table.element_size()
    return {"dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "best_ms": best_ms,
            "bytes_per_s": nbytes / (best_ms / 1e3), "repeats": repeats, "l2_flushed": device == "cuda"}


def floor(tokens: int, vocab: int, hidden: int, topk: int, elem_bytes: int, copy_bw: float, gather_bw: float) -> dict:
    """Issue 3's floor for forward+backward: the logits read and written at the copy bandwidth,
    two K x H gathers per row at the embedding_bag rate."""
    logits_s = 2 * tokens * vocab * elem_bytes / copy_bw
    gathers_s = 2 * tokens * topk * hidden * elem_bytes / gather_bw
    return {"formula": "2*N*V*b/copy_bw + 2*N*K*H*b/gather_bw", "logits_ms": logits_s * 1e3,
            "gathers_ms": gathers_s * 1e3, "total_ms": (logits_s + gathers_s) * 1e3}


def write(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as out:
        json.dump(data, out, indent=1)
        out.write("\n")
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    data = {"shape": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "topk": args.topk,
                      "dtype": args.dtype},
            "versions": versions(), "commit": commit(), "nvidia_smi": nvidia_smi()}
    write(args.json, data)
    data["machine"] = machine(args.device)
    write(args.json, data)
    print(json.dumps({key: data[key] for key in ("versions", "commit", "nvidia_smi")}, indent=1), flush=True)

    data["copy_bytes_per_s"] = measure.copy_bandwidth(args.device)
    write(args.json, data)
    print(f"copy bandwidth: {data['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)", flush=True)

    dtype = DTYPES[args.dtype]
    try:
        data["gather"] = gather_rate(args.device, args.tokens, args.vocab, args.hidden, args.topk, dtype, args.repeats)
    except RuntimeError as error:   # embedding_bag without this dtype here: the rate in float32 instead
        data["gather_error"] = f"{args.dtype}: {type(error).__name__}: {str(error)[:300]}"
        data["gather"] = gather_rate(args.device, args.tokens, args.vocab, args.hidden, args.topk, torch.float32,
                                     args.repeats)
    gather = data["gather"]
    print(f"embedding_bag gather: {gather['bytes'] / 1e9:.2f} GB in {gather['best_ms']:.3f} ms = "
          f"{gather['bytes_per_s'] / 1e9:.1f} GB/s ({gather['dtype']})", flush=True)
    elem_bytes = torch.empty(0, dtype=dtype).element_size()
    data["floor"] = floor(args.tokens, args.vocab, args.hidden, args.topk, elem_bytes, data["copy_bytes_per_s"],
                          gather["bytes_per_s"] * elem_bytes / torch.empty(0, dtype=DTYPES[gather["dtype"]]).element_size())
    write(args.json, data)
    print(f"floor (issue 3): {data['floor']['total_ms']:.3f} ms = {data['floor']['logits_ms']:.3f} (logits) + "
          f"{data['floor']['gathers_ms']:.3f} (gathers)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
