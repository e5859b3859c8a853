"""One benchmark job in its own process: ``python -m bench.worker TASK CONFIG_JSON OUT_JSON``.

TASK ``probe``: the machine (device, versions), the floor (copy bandwidth; exp rate on CPU)
and which implementations can run. TASK ``impl``: one implementation over the token sweep:
check against the reference, warm up, time each mode, measure peak memory.

A process per implementation keeps peak-RSS readings, torch.compile caches and CUDA
out-of-memory failures from leaking into the next one. Progress goes to stdout as lines
starting with ``@@`` (JSON); everything else a library prints goes to stderr.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import traceback

import torch

from . import measure
from .check import compare, loss_and_grads
from .impls import IMPLS, Config, Impl, reference_for
from .inputs import make_embedding, make_set

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def emit(**fields) -> None:
    print("@@" + json.dumps(fields), flush=True)


def make_config(conf: dict) -> Config:
    return Config(device=conf["device"], dtype=DTYPES[conf["dtype"]], vocab=conf["vocab"], hidden=conf["hidden"],
                  topk=conf["topk"], alpha=conf["alpha"], temperature=conf["temperature"],
                  options=tuple((conf.get("options") or {}).items()))


# --------------------------------------------------------------------------- probe

def machine(device: str) -> dict:
    info = {
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cache_bytes": _cpu_last_level_cache(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_bytes": props.total_memory,
            "cuda_runtime": torch.version.cuda,
            "driver": _nvidia_driver(),
            "cache_bytes": getattr(props, "L2_cache_size", 50 << 20),
        })
    else:
        info["device_name"] = info["cpu"]
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_last_level_cache() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/size") as size:
                    text = size.read().strip()
            except OSError:
                continue
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = max(best, value)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return None


def probe(conf: dict) -> dict:
    cfg = make_config(conf)
    device = cfg.device
    info = machine(device)
    emit(stage="floor")
    copy_bw = measure.copy_bandwidth(device)
    exp = measure.exp_throughput(device)
    availability = {}
    for name in conf["impls"]:
        try:
            availability[name] = IMPLS[name].unavailable(cfg)
        except Exception as error:
            availability[name] = f"{type(error).__name__}: {error}"
    return {
        "machine": info,
        "floor": {"copy_bytes_per_s": copy_bw, "exp_elems_per_s": exp["rate"],
                  "exp_elems_per_s_one_thread": exp["per_thread"], "exp_threads": exp["threads"],
                  "formula": measure.FLOOR_FORMULA[device]},
        "availability": availability,
        "cpu_peak_memory": measure.cpu_peak_supported() if device == "cpu" else None,
    }


# --------------------------------------------------------------------------- one implementation

def n_sets(conf: dict, n_tokens: int, elem_bytes: int) -> int:
    """Enough input sets (2 to 8, twice the last-level cache) that a call never finds its logits in cache."""
    set_bytes = n_tokens * conf["vocab"] * elem_bytes
    return int(min(8, max(2, math.ceil(2 * conf["cache_bytes"] / max(set_bytes, 1)))))


def run_impl(conf: dict, save=lambda out: None) -> dict:
    """Every point of the sweep for one implementation; ``save(out)`` after each, so a crash
    (the kernel's OOM killer, a segfault) keeps what was measured before it."""
    impl: Impl = IMPLS[conf["impl"]]
    cfg = make_config(conf)
    if cfg.options and not impl.takes_options:
        raise ValueError(f"{impl.name} does not take the loss options {dict(cfg.options)}: only the package's "
                         "implementations run with them")
    out = {"impl": impl.name, "points": []}
    reason = impl.unavailable(cfg)
    if reason is not None:
        out["unavailable"] = reason
        return out
    if cfg.device == "cuda":
        torch.cuda.init()
    fn = impl.build(cfg)
    ref_fn = reference_for(impl, cfg)
    leaves = impl.leaves(cfg)
    embedding = make_embedding(cfg.vocab, cfg.hidden, cfg.dtype, cfg.device, conf["seed"])
    timer = measure.Timer(cfg.device)
    ran_out = None
    for n_tokens in conf["tokens"]:
        point = {"n_tokens": n_tokens}
        out["points"].append(point)
        if ran_out is not None:
            point.update(status="OOM", reason=f"not run: N={ran_out} already ran out of memory")
            save(out)
            emit(n=n_tokens, stage="done")
            continue
        try:
            _run_point(conf, cfg, impl, fn, ref_fn, leaves, embedding, timer, n_tokens, point)
        except OOM_ERRORS as error:
            point.update(status="OOM", reason=_short(error))
            ran_out = n_tokens
        except RuntimeError as error:
            if "out of memory" in str(error) or "not enough memory" in str(error):
                point.update(status="OOM", reason=_short(error))
                ran_out = n_tokens
            else:
                point.update(status="error", reason=_short(error), traceback=traceback.format_exc()[-4000:])
        except Exception as error:
            point.update(status="error", reason=_short(error), traceback=traceback.format_exc()[-4000:])
        finally:
            embedding.grad = None
            gc.collect()
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
        save(out)
        emit(n=n_tokens, stage="done", status=point.get("status"))
    return out


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _run_point(conf, cfg, impl, fn, ref_fn, leaves, embedding, timer, n_tokens, point) -> None:
    elem_bytes = torch.empty(0, dtype=cfg.dtype).element_size()
    count = n_sets(conf, n_tokens, elem_bytes)
    emit(n=n_tokens, stage="inputs")
    sets = []
    for index in range(count):
        inputs = make_set(impl.kind, n_tokens, cfg.vocab, cfg.hidden, cfg.topk, cfg.dtype, cfg.device,
                          conf["seed"], index)
        inputs["embedding"] = embedding
        sets.append(inputs)
    point["input_sets"] = count

    emit(n=n_tokens, stage="check")
    if impl.oracle:
        point["check"] = {"passed": True, "oracle": True}
    else:
        ref_loss, ref_grads = loss_and_grads(ref_fn, sets[0], leaves)
        loss, grads = loss_and_grads(fn, sets[0], leaves)
        point["check"] = compare(loss, grads, ref_loss, ref_grads, cfg.dtype, impl.tolerance_scale)
        del ref_grads, grads
        if not point["check"]["passed"]:
            point["status"] = "WRONG"
            point["reason"] = "differs from the reference: not timed"
            return

    first = "hidden" if impl.kind == "hidden" else "logits"
    embedding.requires_grad_("embedding" in leaves)
    for inputs in sets:
        inputs[first].requires_grad_(True)
    pristine = [inputs[first].detach().clone() for inputs in sets] if impl.mutates_logits else None
    state = {"call": 0}

    def current() -> dict:
        return sets[state["call"] % count]

    def prepare() -> None:
        state["call"] += 1
        for inputs in sets:
            inputs[first].grad = None
        embedding.grad = None
        if pristine is not None:
            with torch.no_grad():
                current()[first].copy_(pristine[state["call"] % count])

    def forward():
        return fn(current())

    def forward_backward():
        fn(current()).backward()

    runs = {"fwd": forward, "fwd+bwd": forward_backward}
    emit(n=n_tokens, stage="warmup")
    for _ in range(conf["warmup"]):
        prepare()
        forward_backward()
    measure.synchronize(cfg.device)

    point["modes"] = {}
    for mode in conf["modes"]:
        emit(n=n_tokens, stage=f"time {mode}")
        times = [timer(prepare, runs[mode]) for _ in range(conf["repeats"])]
        point["modes"][mode] = measure.summarize(times)

    if conf.get("memory", True) and (cfg.device == "cuda" or conf.get("cpu_peak_memory") is None):
        for mode in conf["modes"]:
            emit(n=n_tokens, stage=f"memory {mode}")
            peak, result = measure.peak_bytes(cfg.device, prepare, runs[mode])
            grads = _gradient_bytes(current(), embedding, first)
            del result
            stats = point["modes"][mode]
            stats["peak_bytes_above_inputs"] = peak
            stats["gradient_bytes"] = grads
            stats["extra_bytes"] = peak - grads
    prepare()
    point["status"] = "ok"


def _gradient_bytes(inputs: dict, embedding: torch.Tensor, first: str) -> int:
    """Bytes of the gradients now held, leaving out any that reuse an input's memory
    (Liger writes the logits' gradient over the logits)."""
    total = 0
    input_ptrs = {inputs[first].untyped_storage().data_ptr(), embedding.untyped_storage().data_ptr()}
    for tensor in (inputs[first], embedding):
        grad = tensor.grad
        if grad is not None and grad.untyped_storage().data_ptr() not in input_ptrs:
            total += grad.numel() * grad.element_size()
    return total


def main(argv: list[str]) -> int:
    task, conf_text, out_path = argv
    conf = json.loads(conf_text)
    if conf.get("threads"):
        torch.set_num_threads(conf["threads"])
    def save(result: dict) -> None:
        with open(out_path + ".tmp", "w") as out:
            json.dump(result, out)
        os.replace(out_path + ".tmp", out_path)

    save(probe(conf) if task == "probe" else run_impl(conf, save))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
