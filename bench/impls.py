"""Every implementation the benchmark runs, and the reference each is checked against.

Two groups share a table:
- ``mixed``: the full loss at the requested alpha (default 0.5); speedups are against
  ``seed-style``, the experiment's formulation (bench/seed_style.py).
- ``ce``: alpha = 0, i.e. cross-entropy alone; speedups are against ``ce-torch``
  (``F.cross_entropy``). Anchors from other projects are run when installed (CUDA only).

An implementation is a function ``inputs -> scalar loss`` with ``inputs`` a dict of
``labels`` and ``logits`` (or ``hidden`` for linear+CE kernels) and ``embedding``; its
gradients are read from the leaves named in ``Impl.leaves``.

The package's implementations (``takes_options``) also run with the loss options of
``Config.options`` (bench/run.py --softcap, --logit-scale, --z-loss, --label-smoothing), and
are then checked against the reference with the same options; the others never get them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fused_cosloss import linear_mixed_loss, mixed_loss
from fused_cosloss.backends import why_unavailable

from .inputs import IGNORE_INDEX
from .seed_style import seed_style_loss

EPS = 1e-12


@dataclass(frozen=True)
class Config:
    """The loss and shapes every implementation is run with."""
    device: str
    dtype: torch.dtype
    vocab: int
    hidden: int
    topk: int | None
    alpha: float
    temperature: float
    options: tuple[tuple[str, float], ...] = ()  # the loss options that are on, as (keyword, value) pairs


# the keyword arguments of mixed_loss and linear_mixed_loss the benchmark can turn on, in the spec's order
OPTION_NAMES = ("logit_scale", "softcap", "label_smoothing", "z_loss")


def option_kwargs(cfg: Config) -> dict:
    """The loss options of ``cfg`` as keyword arguments of mixed_loss / linear_mixed_loss ({} when off)."""
    options = dict(cfg.options)
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown loss options {sorted(unknown)}; the benchmark knows {list(OPTION_NAMES)}")
    return options


@dataclass(frozen=True)
class Impl:
    name: str
    group: str                                   # "mixed" or "ce"
    about: str                                   # one line for the report
    build: Callable[[Config], Callable[[dict], torch.Tensor]]
    unavailable: Callable[[Config], str | None] = lambda cfg: None
    kind: str = "logits"                         # "logits" or "hidden": what the inputs hold
    baseline: bool = False                       # speedups in its group are relative to it
    oracle: bool = False                         # the reference itself
    mutates_logits: bool = False                 # overwrites its input (restored before each call, untimed)
    tolerance_scale: float = 1.0                 # on the dtype's tolerances (documented where used)
    has_floor: bool = True                       # False where the work includes more than the loss (a matmul)
    in_cpu_default: bool = True                  # run on CPU without --impl (the hidden-state rows are slow there)
    takes_options: bool = False                  # the package's: also runs with the loss options (Config.options)

    def alpha(self, cfg: Config) -> float:
        return self.alpha_value(cfg.alpha)

    def alpha_value(self, alpha: float) -> float:
        """The alpha it runs at: the requested one for the mixed loss, 0 for the ce group."""
        return alpha if self.group == "mixed" else 0.0

    def leaves(self, cfg: Config) -> tuple[str, ...]:
        """The inputs it differentiates: logits (or hidden), and embedding where it gets a gradient."""
        first = "hidden" if self.kind == "hidden" else "logits"
        return (first, "embedding") if self.kind == "hidden" or self.alpha(cfg) > 0 else (first,)


# --------------------------------------------------------------------------- the package's own

def _loss_options(cfg: Config, group: str, backend: str, **extra) -> dict:
    """The package's keyword arguments for this configuration (alpha 0 in the ce group)."""
    return dict(alpha=cfg.alpha if group == "mixed" else 0.0, temperature=cfg.temperature, topk=cfg.topk,
                ignore_index=IGNORE_INDEX, backend=backend, **option_kwargs(cfg), **extra)


def _package(backend: str, group: str, inplace_grad: bool = False) -> Callable[[Config], Callable[[dict], torch.Tensor]]:
    def build(cfg: Config):
        loss = functools.partial(mixed_loss, **_loss_options(cfg, group, backend, inplace_grad=inplace_grad))
        return lambda inp: loss(inp["logits"], inp["labels"], inp["embedding"])
    return build


def _linear(backend: str, group: str) -> Callable[[Config], Callable[[dict], torch.Tensor]]:
    """linear_mixed_loss from hidden states with the embedding as the (tied) LM head weight."""
    def build(cfg: Config):
        loss = functools.partial(linear_mixed_loss, **_loss_options(cfg, group, backend))
        return lambda inp: loss(inp["hidden"], inp["embedding"], inp["labels"])
    return build


def _matmul_then(backend: str, group: str) -> Callable[[Config], Callable[[dict], torch.Tensor]]:
    """The logits path the fused-linear mode replaces: hidden @ E.T, then mixed_loss on the logits."""
    def build(cfg: Config):
        loss = functools.partial(mixed_loss, **_loss_options(cfg, group, backend))
        return lambda inp: loss(inp["hidden"] @ inp["embedding"].T, inp["labels"], inp["embedding"])
    return build


def _interpreter_allowed() -> bool:
    """The GPU session's dry run (bench/gpu_session.py --dry) runs the triton rows on CPU under the
    interpreter, to check its plumbing: FUSED_COSLOSS_BENCH_INTERPRETER=1 with TRITON_INTERPRET=1."""
    return os.environ.get("FUSED_COSLOSS_BENCH_INTERPRETER") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _backend_unavailable(backend: str) -> Callable[[Config], str | None]:
    def unavailable(cfg: Config) -> str | None:
        if backend == "triton" and cfg.device != "cuda" and not _interpreter_allowed():
            return "CUDA only here (on CPU tensors Triton runs only in its interpreter, TRITON_INTERPRET=1: not worth timing)"
        # empty tensors of the benchmark's shapes: nothing is touched or computed
        logits = torch.empty(1, cfg.vocab, device=cfg.device, dtype=cfg.dtype)
        table = torch.empty(cfg.vocab, cfg.hidden, device=cfg.device, dtype=cfg.dtype)
        try:
            return why_unavailable(backend, logits, table)
        except Exception as error:  # a backend half-written must not stop the benchmark
            return f"{type(error).__name__}: {error}"
    return unavailable


def _build_compiled(cfg: Config):
    # dynamic=True: one compilation serves the whole token sweep (by default the second N
    # recompiles with dynamic shapes anyway, which costs another ~30 s on 2 CPU cores)
    loss = torch.compile(functools.partial(
        mixed_loss, alpha=cfg.alpha, temperature=cfg.temperature, topk=cfg.topk,
        ignore_index=IGNORE_INDEX, backend="reference", **option_kwargs(cfg)), dynamic=True)
    return lambda inp: loss(inp["logits"], inp["labels"], inp["embedding"])


def _compile_unavailable(cfg: Config) -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if cfg.device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH"
    if cfg.device == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return None


def _build_seed(cfg: Config):
    loss = functools.partial(seed_style_loss, alpha=cfg.alpha, temperature=cfg.temperature, topk=cfg.topk,
                             ignore_index=IGNORE_INDEX)
    return lambda inp: loss(inp["logits"], inp["labels"], inp["embedding"])


def _build_torch_ce(cfg: Config):
    return lambda inp: F.cross_entropy(inp["logits"], inp["labels"], ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------- anchors (CUDA, when installed)

def _needs(module: str, package: str) -> Callable[[Config], str | None]:
    """Available on CUDA when ``module`` imports (an import error is the reason given)."""
    def unavailable(cfg: Config) -> str | None:
        if cfg.device != "cuda":
            return "CUDA only"
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"not installed (pip install {package})"
        try:
            importlib.import_module(module)
        except Exception as error:
            return f"{package} is installed but {module} does not import: {type(error).__name__}: {error}"
        return None
    return unavailable


LIGER_CE = "liger_kernel.transformers.cross_entropy"
LIGER_FLCE = "liger_kernel.transformers.fused_linear_cross_entropy"
CCE = "cut_cross_entropy"


def _liger_loss():
    return importlib.import_module(LIGER_CE).LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")


def cosine_part(logits, labels, embedding, temperature: float, topk: int | None) -> torch.Tensor:
    """Mean over valid positions of 1 - cos_n, without any [N, K, H] or second [N, V] tensor:
    top-k on the logits, softmax over the K, ``F.embedding_bag`` for the weighted sum."""
    valid = labels != IGNORE_INDEX
    k = logits.shape[-1] if topk is None else min(topk, logits.shape[-1])
    # topk's values, not a gather: topk's backward keeps only the indices, so the logits may be
    # overwritten afterwards (by Liger's CE) without upsetting autograd
    top, idx = logits.topk(k, dim=-1)
    weights = torch.softmax(top.float() / temperature, dim=-1)
    table = embedding.float()
    mu = F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")
    target = table[torch.where(valid, labels, 0)]
    cos = (mu * target).sum(-1) / (mu.norm(dim=-1).clamp_min(EPS) * target.norm(dim=-1).clamp_min(EPS))
    return torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum() / valid.sum().clamp_min(1)


def _build_liger_mixed(cfg: Config):
    ce = _liger_loss()

    def loss(inp):
        # the cosine part first: Liger's CE overwrites the logits with their gradient
        dist = cosine_part(inp["logits"], inp["labels"], inp["embedding"], cfg.temperature, cfg.topk)
        return cfg.alpha * dist + (1.0 - cfg.alpha) * ce(inp["logits"], inp["labels"])
    return loss


def _build_liger_ce(cfg: Config):
    ce = _liger_loss()
    return lambda inp: ce(inp["logits"], inp["labels"])


def _build_liger_flce(cfg: Config):
    module = importlib.import_module(LIGER_FLCE)
    loss = module.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return lambda inp: loss(inp["embedding"], inp["hidden"], inp["labels"])


def _build_cce(cfg: Config):
    linear_cross_entropy = importlib.import_module(CCE).linear_cross_entropy
    return lambda inp: linear_cross_entropy(inp["hidden"], inp["embedding"], inp["labels"],
                                            ignore_index=IGNORE_INDEX, reduction="mean")


def _build_matmul_ce(cfg: Config):
    return lambda inp: F.cross_entropy(inp["hidden"] @ inp["embedding"].T, inp["labels"], ignore_index=IGNORE_INDEX)


def _build_torch_linear_ce(cfg: Config):
    # the chunked path (options given): the [N, V] logits are never built whole
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda inp: F.linear_cross_entropy(inp["hidden"], inp["embedding"], inp["labels"],
                                              ignore_index=IGNORE_INDEX, reduction="mean", options=options)


def _torch_linear_ce_unavailable(cfg: Config) -> str | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13)"
    return None


def _matmul_unavailable(cfg: Config) -> str | None:
    reason = _needs(CCE, "cut-cross-entropy")(cfg)
    return None if reason is None else f"only run beside ce-cce, which is unavailable: {reason}"


# --------------------------------------------------------------------------- the registry

IMPLS: dict[str, Impl] = {impl.name: impl for impl in [
    Impl("seed-style", "mixed", "the experiment's formulation: softmax [N,V], top-k of probs, gather [N,K,H], einsum",
         _build_seed, baseline=True),
    Impl("reference", "mixed", "fused_cosloss backend='reference' (pure PyTorch, the oracle)",
         _package("reference", "mixed"), oracle=True, takes_options=True),
    Impl("compile-reference", "mixed", "torch.compile(dynamic=True) of the reference (compile time not counted)",
         _build_compiled, unavailable=_compile_unavailable, takes_options=True),
    Impl("native", "mixed", "fused_cosloss backend='native' (C++ CPU kernel)",
         _package("native", "mixed"), unavailable=_backend_unavailable("native"), takes_options=True),
    Impl("native-inplace", "mixed", "fused_cosloss backend='native', inplace_grad=True (gradient over the logits)",
         _package("native", "mixed", inplace_grad=True), unavailable=_backend_unavailable("native"),
         mutates_logits=True, takes_options=True),
    Impl("triton", "mixed", "fused_cosloss backend='triton' (CUDA kernel)",
         _package("triton", "mixed"), unavailable=_backend_unavailable("triton"), takes_options=True),
    Impl("triton-inplace", "mixed", "fused_cosloss backend='triton', inplace_grad=True (gradient over the logits)",
         _package("triton", "mixed", inplace_grad=True), unavailable=_backend_unavailable("triton"),
         mutates_logits=True, takes_options=True),
    Impl("liger+embbag", "mixed", "Liger-Kernel CE + top-k/softmax/F.embedding_bag cosine (Liger overwrites the logits)",
         _build_liger_mixed, unavailable=_needs(LIGER_CE, "liger-kernel"), mutates_logits=True),
    # the fused-linear mode and the logits path it replaces: hidden states in, the [N,H]x[H,V] matmul included
    Impl("linear-native", "mixed", "fused_cosloss linear_mixed_loss backend='native': logits a chunk at a time",
         _linear("native", "mixed"), unavailable=_backend_unavailable("native"), kind="hidden", has_floor=False,
         in_cpu_default=False, takes_options=True),
    Impl("matmul+native", "mixed", "hidden @ E.T then mixed_loss backend='native' (the logits path)",
         _matmul_then("native", "mixed"), unavailable=_backend_unavailable("native"), kind="hidden",
         has_floor=False, in_cpu_default=False, takes_options=True),
    Impl("linear-triton", "mixed", "fused_cosloss linear_mixed_loss backend='triton': cuBLAS chunks + the kernel",
         _linear("triton", "mixed"), unavailable=_backend_unavailable("triton"), kind="hidden", has_floor=False,
         tolerance_scale=2.5, takes_options=True),
    Impl("matmul+triton", "mixed", "hidden @ E.T then mixed_loss backend='triton' (the logits path)",
         _matmul_then("triton", "mixed"), unavailable=_backend_unavailable("triton"), kind="hidden",
         has_floor=False, tolerance_scale=2.5, takes_options=True),
    Impl("ce-torch", "ce", "F.cross_entropy on the logits as given",
         _build_torch_ce, baseline=True),
    Impl("ce-reference", "ce", "fused_cosloss backend='reference', alpha=0",
         _package("reference", "ce"), oracle=True, takes_options=True),
    Impl("ce-native", "ce", "fused_cosloss backend='native', alpha=0",
         _package("native", "ce"), unavailable=_backend_unavailable("native"), takes_options=True),
    Impl("ce-triton", "ce", "fused_cosloss backend='triton', alpha=0",
         _package("triton", "ce"), unavailable=_backend_unavailable("triton"), takes_options=True),
    Impl("ce-liger", "ce", "Liger-Kernel LigerCrossEntropyLoss (overwrites the logits with their gradient)",
         _build_liger_ce, unavailable=_needs(LIGER_CE, "liger-kernel"), mutates_logits=True),
    Impl("ce-linear-triton", "ce", "fused_cosloss linear_mixed_loss backend='triton', alpha=0",
         _linear("triton", "ce"), unavailable=_backend_unavailable("triton"), kind="hidden", has_floor=False,
         tolerance_scale=2.5, takes_options=True),
    Impl("ce-liger-flce", "ce", "Liger-Kernel LigerFusedLinearCrossEntropyLoss from hidden states",
         _build_liger_flce, unavailable=_needs(LIGER_FLCE, "liger-kernel"), kind="hidden", has_floor=False,
         tolerance_scale=2.5),
    Impl("ce-cce", "ce", "Apple cut-cross-entropy from hidden states: includes the [N,H]x[H,V] matmul",
         _build_cce, unavailable=_needs(CCE, "cut-cross-entropy"), kind="hidden", has_floor=False),
    # bfloat16 logits rounded by the matmul: its gradients drift further from the float32 oracle
    Impl("ce-matmul-torch", "ce", "hidden @ E.T then F.cross_entropy (the unfused comparator of ce-cce)",
         _build_matmul_ce, unavailable=_matmul_unavailable, kind="hidden", has_floor=False, tolerance_scale=2.5),
    Impl("ce-torch-linear", "ce", "torch.nn.functional.linear_cross_entropy, chunked (torch >= 2.13)",
         _build_torch_linear_ce, unavailable=_torch_linear_ce_unavailable, kind="hidden", has_floor=False,
         tolerance_scale=2.5, in_cpu_default=False),
]}


def _build_wrong(cfg: Config):
    """seed-style with the temperature doubled: wrong whenever alpha > 0 (for tests/test_bench.py)."""
    loss = functools.partial(seed_style_loss, alpha=cfg.alpha, temperature=2.0 * cfg.temperature, topk=cfg.topk,
                             ignore_index=IGNORE_INDEX)
    return lambda inp: loss(inp["logits"], inp["labels"], inp["embedding"])


def _build_ignoring_options(cfg: Config):
    """The reference without the loss options: right on the plain rows, wrong on the options rows."""
    return _package("reference", "mixed")(dataclasses.replace(cfg, options=()))


if os.environ.get("FUSED_COSLOSS_BENCH_SELFTEST") == "1":
    # deliberately wrong implementations, so the test sees the WRONG path end to end
    IMPLS["selftest-wrong"] = Impl("selftest-wrong", "mixed", "seed-style with the temperature doubled (a test of the check)",
                                   _build_wrong)
    IMPLS["selftest-ignores-options"] = Impl(
        "selftest-ignores-options", "mixed",
        "the reference that drops the loss options (a test of the options rows' check)", _build_ignoring_options,
        takes_options=True)


def reference_for(impl: Impl, cfg: Config) -> Callable[[dict], torch.Tensor]:
    """The oracle an implementation is checked against, on the same inputs and with the same loss options."""
    alpha = impl.alpha(cfg)
    loss = functools.partial(mixed_loss, alpha=alpha, temperature=cfg.temperature, topk=cfg.topk,
                             ignore_index=IGNORE_INDEX, backend="reference", **option_kwargs(cfg))
    if impl.kind == "hidden":
        # logits from hidden states in float32, as a linear+CE kernel accumulates them
        return lambda inp: loss(inp["hidden"].float() @ inp["embedding"].float().T, inp["labels"], inp["embedding"])
    return lambda inp: loss(inp["logits"], inp["labels"], inp["embedding"])


def select(names: list[str] | None, device: str = "cuda") -> list[Impl]:
    """The implementations named (by default all; on CPU those ``in_cpu_default``), in registry order."""
    if names is None:
        return [impl for impl in IMPLS.values() if device != "cpu" or impl.in_cpu_default]
    unknown = [name for name in names if name not in IMPLS]
    if unknown:
        raise ValueError(f"--impl: unknown {unknown}; choose from {list(IMPLS)}")
    return [impl for impl in IMPLS.values() if impl.name in names]
