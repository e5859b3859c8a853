"""Timing, peak memory and the hardware floor, on CPU and CUDA.

Timing: ``prepare`` (untimed: drop gradients, restore inputs an implementation overwrote,
on CUDA also flush the L2 cache) then ``run`` under a monotonic clock
(``time.perf_counter``) on CPU, or between two CUDA events on GPU.

Peak memory beyond the inputs: on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the call. On CPU, the
process's resident-set high-water mark (``VmHWM`` in /proc/self/status, reset by writing
5 to /proc/self/clear_refs) minus the resident set before the call, after ``malloc_trim``
(and the native kernel's buffer cache) has handed freed memory back so that every page the
call needs is counted.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Times ``run()`` after an untimed ``prepare()``; returns milliseconds."""

    def __init__(self, device: str):
        self.device = device
        self._flush = None
        if device == "cuda":
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def __call__(self, prepare: Callable[[], None], run: Callable[[], object]) -> float:
        prepare()
        if self.device == "cuda":
            self._flush.zero_()                       # evict the previous call's data from L2
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = run()
            end.record()
            end.synchronize()
            del result                                # freeing the graph is not timed
            return start.elapsed_time(end)
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        del result
        return elapsed * 1e3


def summarize(times_ms: list[float]) -> dict:
    """Median and spread of repeated timings."""
    ordered = sorted(times_ms)
    return {
        "median_ms": statistics.median(ordered),
        "p20_ms": _quantile(ordered, 0.2),
        "p80_ms": _quantile(ordered, 0.8),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "times_ms": times_ms,
    }


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident (peaks then undercount)
        pass


def _release_package_caches() -> None:
    """The native kernel keeps freed gradient buffers for reuse: free them, so that the peak
    counts the call's gradients as fresh memory (as a first call would need)."""
    native = sys.modules.get("fused_cosloss.native")
    if native is not None:
        native.empty_cache()


def cpu_peak_supported() -> str | None:
    """None when the RSS high-water mark can be reset here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        _proc_status_kib("VmHWM")
        return None
    except OSError as error:
        return f"cannot reset the peak RSS (/proc/self/clear_refs: {error})"


def peak_bytes(device: str, prepare: Callable[[], None], run: Callable[[], object]) -> tuple[int, object]:
    """Peak memory of ``run()`` above what was in use before it; returns (bytes, run's result),
    the result still alive so the caller can look at what it holds (gradients, the graph)."""
    prepare()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    _release_package_caches()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _proc_status_kib("VmRSS")
    result = run()
    return (_proc_status_kib("VmHWM") - base) * 1024, result


# --------------------------------------------------------------------------- the floor

def _best_seconds(device: str, fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls: a floor is what the hardware can do, not a typical call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes read + written per second by a large tensor copy."""
    nbytes = nbytes or (1 << 30 if device == "cuda" else 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    seconds = _best_seconds(device, lambda: dst.copy_(src), 7 if device == "cpu" else 20)
    return 2 * nbytes / seconds


def exp_throughput(device: str) -> dict:
    """float32 ``torch.exp`` elements per second, compute-bound.

    CPU: one thread on 64 Ki elements (in L2), times the number of torch threads: the rate
    all cores reach when nothing else runs (measured directly, several threads on a loaded
    machine mostly measure the contention). GPU: a 64 MiB buffer, for information only.
    """
    if device == "cuda":
        x = torch.randn(1 << 24, device=device)
        out = torch.empty_like(x)
        rate = x.numel() * 10 / _best_seconds(device, lambda: [torch.exp(x, out=out) for _ in range(10)], 7)
        return {"rate": rate, "per_thread": None, "threads": None}
    threads = torch.get_num_threads()
    x = torch.randn(1 << 16)
    out = torch.empty_like(x)
    calls = 10      # short windows, many of them: the best one is the least disturbed by other processes
    torch.set_num_threads(1)
    try:
        per_thread = x.numel() * calls / _best_seconds(device, lambda: [torch.exp(x, out=out) for _ in range(calls)], 41)
    finally:
        torch.set_num_threads(threads)
    return {"rate": per_thread * threads, "per_thread": per_thread, "threads": threads}


FLOOR_FORMULA = {
    "cpu": {
        "fwd": "N*V/exp_rate + N*V*b/copy_bw",
        "fwd+bwd": "2*N*V/exp_rate + 2*N*V*b/copy_bw",
        "text": "CPU floor: one exp per logit forward and one backward at the measured float32 exp rate (one "
                "thread's in-cache torch.exp rate times the torch threads), plus one "
                "read of the logits (forward) and one write of their gradient (backward) at the measured copy "
                "bandwidth (copy_bw = bytes read + written per second; b = bytes per logit element).",
    },
    "cuda": {
        "fwd": "N*V*b/copy_bw",
        "fwd+bwd": "2*N*V*b/copy_bw",
        "text": "GPU floor: one read of the logits (forward) and one write of their gradient (backward) at the "
                "measured copy bandwidth (copy_bw = bytes read + written per second; b = bytes per logit element); "
                "exps are not the bound there.",
    },
}


def floor_ms(device: str, mode: str, n_tokens: int, vocab: int, elem_bytes: int, copy_bw: float,
             exp_rate: float | None) -> float:
    """The time no implementation can beat for this shape, per FLOOR_FORMULA."""
    logits = n_tokens * vocab
    passes = 1 if mode == "fwd" else 2
    seconds = passes * logits * elem_bytes / copy_bw
    if device == "cpu":
        seconds += passes * logits / exp_rate
    return seconds * 1e3
