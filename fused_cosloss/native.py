"""The native CPU backend: the C++ kernel in ``csrc/`` behind the kernel-backend protocol.

The extension is compiled with ninja through ``torch.utils.cpp_extension`` on first use
(installing the package needs no compiler) into a cache directory,
``$FUSED_COSLOSS_CACHE`` or ``~/.cache/fused_cosloss`` (``$XDG_CACHE_HOME`` is honoured),
under a name that hashes the sources, the torch and Python versions, the compiler
flags and the instruction set. Later processes import the built library directly.

The instruction set is the one torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, else the portable
DEFAULT build); the whole extension is compiled for it, with ATen's ``Vectorized``
classes and SLEEF's vectorised ``expf`` from libtorch, and a build is only ever
loaded on a CPU that torch says supports its instruction set (no ``-march=native``).
``FUSED_COSLOSS_NATIVE_ISA`` asks for a lower one (AVX2 or DEFAULT), e.g. to test them.

A build says so on the ``fused_cosloss`` logger when it starts and when it is done
(``build_report.py``); ``python -m fused_cosloss.build`` runs it ahead of time. If it fails,
``unavailable_reason`` returns its cause in one line, the fix and where the build log is, so
that ``backend="native"`` raises that and ``backend="auto"`` warns once and uses the reference.
Other knobs: ``FUSED_COSLOSS_VERBOSE=1`` (ninja's output as it builds, and the build log in
the message of a failure), ``FUSED_COSLOSS_CSRC`` (a different source directory),
``FUSED_COSLOSS_DISABLE_NATIVE=1`` (report the backend unavailable),
``FUSED_COSLOSS_NATIVE_POOL_MB`` (the gradient-buffer cache below; 0 turns it off).

Gradient buffers of 4 MiB or more come from a small cache (``csrc/output_pool.h``): a
gradient autograd frees is kept, up to 1 GiB by default, and handed out again for the
next request of the same size, so the next step does not fault its pages in again (which
costs more than computing the gradient on CPU). :func:`empty_cache` frees it.

The protocol (see ``protocol.py``): ``unavailable_reason``, ``forward_rows``,
``backward_rows``. The loss options (logit scale, soft-cap, label smoothing) are applied
inside the kernel as each logit is read; ``forward_rows`` also returns lse_n, and
``backward_rows`` takes its coefficient ``grad_lse`` (docs/native_cpu.md, "Loss options").
The saved state is ``(stats, idx, w, c, g2)``: per row the
maximum m, log sum exp(z - m) and the cosine, the top-k indices (int32), their softmax
weights, the cosine's logit-gradient coefficients at them, and dcos/dmu, dcos/de
(``N * (3K + 2H + 3)`` floats in all; only ``stats`` without the cosine term).

A long call can be interrupted (Ctrl-C raises ``KeyboardInterrupt`` from it): the kernel
runs its rows in blocks of some tens of milliseconds and lets Python handle pending signals
between them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.resources
import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from . import build_report
from .options import LossOptions
from .protocol import RowsForward, ShardRows

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_COMMON_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_COMMON_LDFLAGS = ["-fopenmp"]
_ISA_CFLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_ISA_ORDER = ("DEFAULT", "AVX2", "AVX512")

_lock = threading.Lock()
_state: dict = {}  # "module" or "error", once a load was attempted


# ----------------------------------------------------------------------------- build


def _source_dir() -> Path:
    """csrc/ of a checkout, or fused_cosloss/csrc of an installed package (or $FUSED_COSLOSS_CSRC)."""
    override = os.environ.get("FUSED_COSLOSS_CSRC")
    if override:
        return Path(override)
    packaged = Path(str(importlib.resources.files("fused_cosloss") / "csrc"))
    if packaged.is_dir() and any(packaged.glob("*.cpp")):
        return packaged
    return Path(__file__).resolve().parent.parent / "csrc"


def _cache_root() -> Path:
    if os.environ.get("FUSED_COSLOSS_CACHE"):
        return Path(os.environ["FUSED_COSLOSS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_cosloss"


def isa() -> str:
    """The instruction set the extension is built for on this machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    best = capability if capability in _ISA_CFLAGS else "DEFAULT"
    wanted = os.environ.get("FUSED_COSLOSS_NATIVE_ISA", "").upper()
    if wanted in _ISA_CFLAGS and _ISA_ORDER.index(wanted) <= _ISA_ORDER.index(best):
        return wanted
    return best


def _build_config():
    src = _source_dir()
    files = sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h")) if src.is_dir() else []
    if not any(p.suffix == ".cpp" for p in files):
        raise FileNotFoundError(f"no C++ sources (*.cpp) in {src}")
    chosen = isa()
    cflags = _COMMON_CFLAGS + _ISA_CFLAGS[chosen]
    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.git_version), sys.version, sys.platform,
                 os.environ.get("CXX", ""), chosen, " ".join(cflags), " ".join(_COMMON_LDFLAGS)):
        digest.update(part.encode() + b"\0")
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    tag = digest.hexdigest()[:16]
    return files, chosen, cflags, tag


def _ensure_ninja_on_path() -> None:
    """The ``ninja`` pip package installs its binary next to the interpreter; find it without an activated venv."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore

        candidates.insert(0, getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for directory in candidates:
        if directory and os.path.exists(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _import_library(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build():
    files, chosen, cflags, tag = _build_config()
    name = f"fused_cosloss_native_{tag}"
    build_dir = _cache_root() / f"native-{chosen.lower()}-{tag}"
    done = build_dir / "BUILD_OK"
    if done.exists():  # built before, by this or another process: import it without ninja
        for library in (build_dir / f"{name}.so", build_dir / f"{name}.pyd"):
            if library.exists():
                return _import_library(name, library)

    compiler, compiler_where = build_report.find_compiler()  # before anything else: the likeliest failure
    _ensure_ninja_on_path()
    build_report.require_ninja()
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    for path in files:  # a private copy: the build does not depend on where the package lives
        target = src_dir / path.name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            tmp = src_dir / f".{path.name}.{os.getpid()}.tmp"
            tmp.write_bytes(path.read_bytes())
            os.replace(tmp, target)
    from torch.utils import cpp_extension

    build_report.announce_start(compiler, compiler_where, build_dir)
    started = time.monotonic()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(src_dir / p.name) for p in files if p.suffix == ".cpp"],
            extra_cflags=cflags,
            extra_ldflags=_COMMON_LDFLAGS,
            extra_include_paths=[str(src_dir)],
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=build_report.verbose(),
        )
    except Exception as error:  # the compiler's or the loader's message, led by its cause
        raise build_report.diagnose(error, compiler, build_dir / "build.log") from error
    done.write_text(f"{name}\n{chosen}\n{' '.join(cflags)}\n")
    build_report.announce_done(time.monotonic() - started, build_dir)
    _prune_old_builds(build_dir.parent)
    return module


KEEP_BUILDS = 8
PRUNE_AFTER_S = 7 * 24 * 3600


def _prune_old_builds(root: Path) -> None:
    """After a new build: remove finished builds beyond the KEEP_BUILDS newest that were last
    built a week ago or more (each source edit or torch upgrade makes a new one). Builds in
    progress (no BUILD_OK yet) are never touched; a removed build still loaded elsewhere keeps
    working, and is rebuilt if asked for again."""
    finished = []
    for path in root.glob("native-*"):
        marker = path / "BUILD_OK"
        try:
            finished.append((marker.stat().st_mtime, path))
        except OSError:
            continue
    finished.sort(reverse=True)
    now = time.time()
    for mtime, path in finished[KEEP_BUILDS:]:
        if now - mtime >= PRUNE_AFTER_S:
            shutil.rmtree(path, ignore_errors=True)


def _load():
    """(module, None) once built, or (None, why it is not): built once per process."""
    with _lock:
        if not _state:
            if os.environ.get("FUSED_COSLOSS_DISABLE_NATIVE", "") not in ("", "0"):
                _state["error"] = "disabled by FUSED_COSLOSS_DISABLE_NATIVE"
            else:
                try:
                    _state["module"] = _build()
                except build_report.NativeBuildError as error:  # cause, fix, where the log is
                    _state["error"], _state["exception"] = str(error), error
                except Exception as error:  # anything else: report, never crash the caller
                    _state["error"] = f"the native CPU kernel failed to build or load: {type(error).__name__}: {error}"
                    _state["exception"] = error
        return _state.get("module"), _state.get("error")


def _reset() -> None:
    """Forget the loaded (or failed) build, so the next use loads again (tests)."""
    with _lock:
        _state.clear()


def extension():
    """The compiled extension module; RuntimeError with the build's message if it failed (chained
    to the build's own exception, whose message holds the full build log)."""
    module, error = _load()
    if module is None:
        raise RuntimeError(error) from _state.get("exception")
    return module


# ----------------------------------------------------------------------------- protocol


def empty_cache() -> int:
    """Free the gradient buffers the native kernel keeps for reuse; returns the bytes freed
    (0 when the extension was never loaded)."""
    module = _state.get("module")
    return int(module.release_cached_buffers()) if module is not None else 0


def cached_bytes() -> int:
    """Bytes of gradient buffers the native kernel keeps for reuse."""
    module = _state.get("module")
    return int(module.cached_bytes()) if module is not None else 0


def unavailable_reason(logits: torch.Tensor, embedding: torch.Tensor) -> str | None:
    """Why the native kernel cannot run on these tensors, or None."""
    for name, tensor in (("logits", logits), ("embedding", embedding)):
        if tensor.device.type != "cpu":
            return f"the native kernel runs on CPU tensors only, {name} is on {tensor.device}"
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"the native kernel takes float32 or bfloat16 {name}, got {tensor.dtype}"
    return _load()[1]


def _option_args(options: LossOptions) -> dict:
    """The loss options the kernel takes beside k and ignore_index (no soft-cap: 0.0)."""
    return dict(logit_scale=options.logit_scale, softcap=0.0 if options.softcap is None else options.softcap,
                label_smoothing=options.label_smoothing)


def forward_rows(logits, labels, embedding, options: LossOptions) -> RowsForward:
    """Per-row ce, cos, correct, lse and the saved state (see the module docstring)."""
    ce, cos, correct, lse, stats, idx, w, c, g2 = extension().forward(
        logits, labels, embedding, temperature=options.temperature, k=options.k, ignore_index=options.ignore_index,
        with_cos=options.with_cos, **_option_args(options))
    saved = (stats, idx, w, c, g2) if options.with_cos else (stats,)
    return RowsForward(ce, cos, correct, lse, saved)


def shard_rows(logits, labels, options: LossOptions, k: int) -> ShardRows:
    """The shard's statistics and k best candidates (``protocol.ShardRows``) from one forward pass
    of the kernel: S is the kernel's own selection (its cosine is taken against a one-column zero
    table, which costs next to nothing and is not used)."""
    probe = torch.zeros(logits.shape[1], 1, device=logits.device, dtype=torch.float32)
    selecting = dataclasses.replace(options, k=k, with_cos=True, label_smoothing=0.0)
    _, _, _, _, stats, idx, _, _, _ = extension().forward(
        logits, labels, probe, temperature=selecting.temperature, k=k, ignore_index=selecting.ignore_index,
        with_cos=True, **_option_args(selecting))
    return ShardRows(stats[:, 0].clone(), stats[:, 1].clone(), idx.long(), (stats,))


def fake_forward_rows(logits, labels, embedding, options: LossOptions) -> RowsForward:
    """Empty tensors of the shapes and dtypes ``forward_rows`` returns (the custom op's fake kernel)."""
    n, hidden = logits.shape[0], embedding.shape[1]
    with_cos = options.with_cos
    rows, kk = (n, options.k) if with_cos else (0, 0)
    f32 = dict(device=logits.device, dtype=torch.float32)
    stats = torch.empty(n, 3, **f32)
    saved = (stats, torch.empty(rows, kk, device=logits.device, dtype=torch.int32), torch.empty(rows, kk, **f32),
             torch.empty(rows, kk, **f32), torch.empty(rows, 2, hidden, **f32))
    correct = torch.empty(n, device=logits.device, dtype=torch.bool)
    return RowsForward(torch.empty(n, **f32), torch.empty(n, **f32), correct, torch.empty(n, **f32),
                       saved if with_cos else (stats,))


def backward_rows(logits, labels, embedding, saved, grad_ce, grad_cos, options: LossOptions, *,
                  need_logits_grad, need_embedding_grad, inplace=False, embedding_grad_out=None, grad_lse=None):
    """Gradients of sum_n grad_ce[n] ce_n + grad_cos[n] cos_n + grad_lse[n] lse_n (``grad_lse`` None:
    no lse term) in the dtypes of logits and embedding (``inplace``: into the logits' storage;
    ``embedding_grad_out``: added to that float32 tensor)."""
    stats, *rest = saved
    with_cos = options.with_cos
    if with_cos:
        idx, w, c, g2 = rest
    else:
        idx = w = c = g2 = stats.new_empty(0)
    grad_lse = stats.new_empty(0) if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    dlogits, dembedding = extension().backward(
        logits, labels, embedding, stats, idx, w, c, g2, grad_ce=grad_ce.to(torch.float32).contiguous(),
        grad_cos=grad_cos.to(torch.float32).contiguous(), grad_lse=grad_lse, k=options.k,
        ignore_index=options.ignore_index, with_cos=with_cos, need_logits_grad=bool(need_logits_grad),
        need_embedding_grad=bool(need_embedding_grad), inplace=bool(inplace), embedding_grad_out=embedding_grad_out,
        **_option_args(options))
    # Without the cosine term the loss does not depend on the embedding: no gradient, as in the reference.
    wanted = need_embedding_grad and with_cos and embedding_grad_out is None
    return (dlogits if need_logits_grad else None), (dembedding if wanted else None)
