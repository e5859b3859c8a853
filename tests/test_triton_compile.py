"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, with no GPU needed.

Each kernel is compiled (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``) at the
benchmark configuration (V = 50257, K = 256, H = 768, bfloat16 logits and embedding) with
the tile sizes the backend launches on a GPU, and ``cuobjdump --dump-resource-usage`` on
the cubin must report no local memory (register spills). Each kernel that reads the loss
options (docs/spec.md, "Loss options") is compiled again with all of them on ("+options"),
and the row kernel with each on alone: they are constexpr flags, so each is another kernel.
Skipped only where this triton has no CUDA backend (or ships no cuobjdump).

Run ``pytest tests/test_triton_compile.py -s`` to print the register counts.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ != "__main__":
    import pytest

    triton = pytest.importorskip("triton")
else:
    import triton

VOCAB, TOPK, HIDDEN = 50257, 256, 768
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:  # pragma: no cover
        return False
    return "nvidia" in backends


# ---------------------------------------------------------------------------------------------
# The compilation runs in a fresh interpreter process (``python tests/test_triton_compile.py``):
# the rest of the suite imports the kernels under TRITON_INTERPRET=1, where they are not
# compilable, and the interpreter leaves triton.language patched in the process it ran in.


def _source(kernel, types: dict, constexprs: dict):
    """An ASTSource with pointers 16-byte aligned, as the JIT specialises torch allocations. A
    pointer the launcher passes as None is a constexpr None in ``constexprs``, as the JIT makes it."""
    from triton.compiler import ASTSource

    fn = kernel
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
        path = handle.name
    try:
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    assert {"REG", "STACK", "LOCAL"} <= usage.keys(), f"unexpected cuobjdump output:\n{text}"
    return usage


def _bench_tiles():
    from fused_cosloss.triton_ops import tiles

    assert not tiles.interpreted()
    return tiles.gather_tiles(8192, TOPK, HIDDEN)


def _config():
    from fused_cosloss.triton_ops.config import CONFIG

    return CONFIG


# The loss options a variant turns on: the logit scale, the soft-cap, label smoothing, and the
# z-loss (the coefficient of lse: a pointer, None without it).
ALL_OPTIONS = ("scale", "cap", "smoothing", "z-loss")


def _loss_options(on=()):
    from fused_cosloss.options import LossOptions

    return LossOptions(1.0, TOPK, -100, True, logit_scale=2.0 if "scale" in on else 1.0,
                       softcap=30.0 if "cap" in on else None, label_smoothing=0.1 if "smoothing" in on else 0.0)


def _option_constexprs(on, smoothing=True):
    """SCALE and CAP (and SMOOTH) as the launchers pass them for the options ``on``."""
    from fused_cosloss.triton_ops.transform import smoothing_args, transform_args

    options = _loss_options(on)
    flags = {key: value for key, value in transform_args(options).items() if key.isupper()}
    if smoothing:
        flags.update(SMOOTH=smoothing_args(options)["SMOOTH"])
    return flags


OPTION_TYPES = dict(scale="fp32", inv_cap="fp32", cap="fp32", smoothing="fp32")


ROW_TYPES = dict(
    logits_ptr="*bf16", stride_row="i32", labels_ptr="*i64", N="i32", V="i32", K="i32", C="i32", ignore_index="i32",
    temperature="fp32", ce_ptr="*fp32", correct_ptr="*i8", stats_ptr="*fp32", tie_ptr="*i32", s_idx_ptr="*i32",
    s_val_ptr="*fp32", scratch_idx_ptr="*i32", scratch_val_ptr="*fp32", grad_ce_ptr="*fp32", grad_cos_ptr="*fp32",
    grad_lse_square_ptr="*fp32", dlogits_ptr="*bf16", out_stride="i32", **OPTION_TYPES,
)


def _row_stats(mode: int, logits: str = "bf16", grad: bool = False, on=()):
    from fused_cosloss.triton_ops import forward, tiles
    from fused_cosloss.triton_ops.transform import transforms

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[logits]
    key_dtype = torch.float32 if transforms(_loss_options(on)) else dtype  # as launch_row_stats
    key16, npass = tiles.key_constants(key_dtype)
    heavy = "cap" in on or "smoothing" in on  # as launch_row_stats
    capacity = tiles.candidate_capacity(TOPK)
    types = dict(ROW_TYPES, logits_ptr=f"*{logits}", s_val_ptr=f"*{logits}", dlogits_ptr=f"*{logits}")
    constexprs = dict(MODE=mode, KEY16=key16, NPASS=npass, GRAD=grad, BR=1,
                      BV=tiles.row_kernel_lanes(VOCAB, TOPK, mode, heavy), BC=tiles.scratch_block(capacity),
                      BG=tiles.gradient_pass_lanes(VOCAB, mode, heavy), **_option_constexprs(on))
    # the pointers launch_row_stats passes as None: S and its scratch outside the sparse mode,
    # the gradient's without it
    if mode != forward.SPARSE:
        constexprs.update(s_idx_ptr=None, s_val_ptr=None, scratch_idx_ptr=None, scratch_val_ptr=None)
    if not grad:
        constexprs.update(grad_ce_ptr=None, grad_cos_ptr=None, dlogits_ptr=None)
    if not grad or "z-loss" not in on:
        constexprs.update(grad_lse_square_ptr=None)
    options = tiles.row_kernel_options(key_dtype, mode)
    return _source(forward.row_stats_kernel, types, constexprs), options


def _cosine(on=()):
    from fused_cosloss.triton_ops import forward

    tiles = _bench_tiles()
    types = dict(emb_ptr="*bf16", labels_ptr="*i64", stats_ptr="*fp32", s_idx_ptr="*i16", s_val_ptr="*bf16",
                 cstats_ptr="*fp32", N="i32", K="i32", H="i32", ignore_index="i32", temperature="fp32", **OPTION_TYPES)
    constexprs = dict(BR=1, BK=tiles["BK"], BH=tiles["BH"], **_option_constexprs(on, smoothing=False))
    from fused_cosloss.triton_ops.tiles import cosine_options

    return _source(forward.cosine_kernel, types, constexprs), cosine_options(bool(on))


def _bench_chunk() -> int:
    from fused_cosloss.triton_ops import tiles

    return tiles.hidden_chunk(VOCAB, HIDDEN, 2)


def _direction_chunk(on=()):
    from fused_cosloss.triton_ops import backward
    from fused_cosloss.triton_ops.tiles import next_pow2

    tiles = _bench_tiles()
    types = dict(emb_ptr="*bf16", labels_ptr="*i64", s_idx_ptr="*i16", s_val_ptr="*bf16", stats_ptr="*fp32",
                 cstats_ptr="*fp32", grad_cos_ptr="*fp32", g_ptr="*fp32",
                 t_ptr="*fp32", N="i32", K="i32", H="i32", h0="i32", C="i32", ignore_index="i32",
                 temperature="fp32", **OPTION_TYPES)
    constexprs = dict(WRITE_T=True, BR=1, BK=tiles["BK"],
                      BH=min(tiles["BH"], next_pow2(_bench_chunk())), **_option_constexprs(on, smoothing=False))
    return _source(backward.direction_chunk_kernel, types, constexprs), _config().cosine_warps


def _backward(with_cos: bool, on=()):
    from fused_cosloss.triton_ops import backward, tiles
    types = dict(logits_ptr="*bf16", stride_row="i32", labels_ptr="*i64", grad_ce_ptr="*fp32", grad_cos_ptr="*fp32",
                 grad_lse_ptr="*fp32", stats_ptr="*fp32", tie_ptr="*i32", dlogits_ptr="*bf16", out_stride="i32",
                 N="i32", V="i32", ignore_index="i32", **OPTION_TYPES)
    constexprs = dict(WITH_COS=with_cos, BR=1, BV=tiles.row_block(VOCAB), **_option_constexprs(on))
    if "z-loss" not in on:
        constexprs.update(grad_lse_ptr=None)
    return _source(backward.backward_rows_kernel, types, constexprs), _config().backward_warps


def _embedding_grad(chunk: int | None = None, first: bool = False, on=()):
    from fused_cosloss.triton_ops import embedding_grad
    from fused_cosloss.triton_ops.tiles import vocab_tiles

    tiles = vocab_tiles(chunk or _bench_chunk())
    types = dict(demb_ptr="*bf16", emb_ptr="*bf16", s_val_ptr="*bf16", entries_ptr="*i32",
                 offsets_ptr="*i32", s_ptr="*fp32", PIECES="i32", PIECE_LEN="i32", K="i32", t_rows_ptr="*i64",
                 t_offsets_ptr="*i64", g_ptr="*fp32", t_ptr="*fp32", chunk_stride="i32", stats_ptr="*fp32",
                 grad_cos_ptr="*fp32", V="i32", H="i32", h0="i32", C="i32", temperature="fp32", **OPTION_TYPES)
    # the sparse path's launch without embedding_grad_out: no base (None)
    constexprs = dict(base_ptr=None, FIRST=first, WRITE_S=True, WRITE_DE=True, HAS_BASE=False, VB=tiles["VB"],
                      BE=tiles["BE"], BC=tiles["BC"], **_option_constexprs(on, smoothing=False))
    return _source(embedding_grad.embedding_grad_kernel, types, constexprs), dict(num_warps=tiles["NW"],
                                                                                   maxnreg=tiles["MAXNREG"])


def _embedding_grad_targets_only():
    """The dense path's launch (dense.add_target_terms): the target entries alone, no entries of S
    (their pointers None), added to a float32 base."""
    from fused_cosloss.triton_ops import embedding_grad
    from fused_cosloss.triton_ops.tiles import vocab_tiles

    tiles = vocab_tiles(512)
    types = dict(demb_ptr="*bf16", base_ptr="*fp32", emb_ptr="*bf16", PIECES="i32", PIECE_LEN="i32", K="i32",
                 t_rows_ptr="*i64", t_offsets_ptr="*i64", t_ptr="*fp32", chunk_stride="i32", V="i32", H="i32",
                 h0="i32", C="i32", temperature="fp32", **OPTION_TYPES)
    constexprs = dict(s_val_ptr=None, entries_ptr=None, offsets_ptr=None, s_ptr=None, g_ptr=None, stats_ptr=None,
                      grad_cos_ptr=None, FIRST=True, WRITE_S=False, WRITE_DE=True, HAS_BASE=True, VB=tiles["VB"],
                      BE=tiles["BE"], BC=tiles["BC"], **_option_constexprs((), smoothing=False))
    return _source(embedding_grad.embedding_grad_kernel, types, constexprs), dict(num_warps=tiles["NW"],
                                                                                   maxnreg=tiles["MAXNREG"])


def _selected_grad(on=()):
    from fused_cosloss.triton_ops import backward, tiles
    types = dict(labels_ptr="*i64", s_idx_ptr="*i16", s_val_ptr="*bf16", s_dot_ptr="*fp32", stats_ptr="*fp32",
                 grad_ce_ptr="*fp32", grad_cos_ptr="*fp32", grad_lse_ptr="*fp32", dlogits_ptr="*bf16",
                 out_stride="i32", N="i32", K="i32", V="i32", ignore_index="i32", temperature="fp32", **OPTION_TYPES)
    constexprs = dict(BR=1, BK=tiles.selected_block(TOPK), **_option_constexprs(on))
    if "z-loss" not in on:
        constexprs.update(grad_lse_ptr=None)
    return _source(backward.selected_grad_kernel, types, constexprs), _config().cosine_warps


def _transformed_block():
    """The dense path's z' and dz'/dz of a block of rows (launched only with a scale or a cap)."""
    from fused_cosloss.triton_ops import dense, tiles

    types = dict(logits_ptr="*bf16", stride_row="i32", out_ptr="*fp32", slope_ptr="*fp32", V="i32",
                 scale="fp32", inv_cap="fp32", cap="fp32")
    constexprs = dict(BV=tiles.row_block(VOCAB), **_option_constexprs(ALL_OPTIONS, smoothing=False))
    return _source(dense.transformed_block_kernel, types, constexprs), _config().backward_warps


KERNELS = {
    "row_stats[sparse,bf16]": lambda: _row_stats(1),
    "row_stats[sparse,fp32]": lambda: _row_stats(1, "fp32"),
    "row_stats[ce-only]": lambda: _row_stats(0),
    "row_stats[dense]": lambda: _row_stats(2),
    "row_stats[sparse,bf16,gradient]": lambda: _row_stats(1, grad=True),
    "row_stats[sparse,fp32,gradient]": lambda: _row_stats(1, "fp32", grad=True),
    "row_stats[ce-only,gradient]": lambda: _row_stats(0, grad=True),
    "cosine": _cosine,
    "direction_chunk": _direction_chunk,
    "backward[cos]": lambda: _backward(True),
    "backward[ce-only]": lambda: _backward(False),
    "vocabulary_pass[first chunk]": lambda: _embedding_grad(first=True),
    "vocabulary_pass[later chunk]": _embedding_grad,
    "vocabulary_pass[C=512]": lambda: _embedding_grad(512),
    "vocabulary_pass[targets only]": _embedding_grad_targets_only,
    "selected_grad": _selected_grad,
    # the loss options on (constexpr flags: other kernels)
    **{f"row_stats[{name}]+{option}": (lambda args=args, option=option: _row_stats(*args, on=(option,)))
       for name, args in (("sparse,bf16", (1,)), ("sparse,fp32", (1, "fp32")), ("ce-only", (0,)), ("dense", (2,)))
       for option in ("scale", "cap", "smoothing")},
    **{f"row_stats[{name}]+{option}": (lambda args=args, option=option: _row_stats(*args, grad=True, on=(option,)))
       for name, args in (("sparse,bf16,gradient", (1,)), ("sparse,fp32,gradient", (1, "fp32")),
                          ("ce-only,gradient", (0,)))
       for option in ALL_OPTIONS},
    "row_stats[sparse,bf16]+options": lambda: _row_stats(1, on=ALL_OPTIONS),
    "row_stats[sparse,fp32]+options": lambda: _row_stats(1, "fp32", on=ALL_OPTIONS),
    "row_stats[ce-only]+options": lambda: _row_stats(0, on=ALL_OPTIONS),
    "row_stats[dense]+options": lambda: _row_stats(2, on=ALL_OPTIONS),
    "row_stats[sparse,bf16,gradient]+options": lambda: _row_stats(1, grad=True, on=ALL_OPTIONS),
    "row_stats[sparse,fp32,gradient]+options": lambda: _row_stats(1, "fp32", grad=True, on=ALL_OPTIONS),
    "row_stats[ce-only,gradient]+options": lambda: _row_stats(0, grad=True, on=ALL_OPTIONS),
    "cosine+options": lambda: _cosine(ALL_OPTIONS),
    "direction_chunk+options": lambda: _direction_chunk(ALL_OPTIONS),
    "backward[cos]+options": lambda: _backward(True, ALL_OPTIONS),
    "backward[ce-only]+options": lambda: _backward(False, ALL_OPTIONS),
    "vocabulary_pass[first chunk]+options": lambda: _embedding_grad(first=True, on=ALL_OPTIONS),
    "vocabulary_pass[later chunk]+options": lambda: _embedding_grad(on=ALL_OPTIONS),
    "vocabulary_pass[C=512]+options": lambda: _embedding_grad(512, on=ALL_OPTIONS),
    "selected_grad+options": lambda: _selected_grad(ALL_OPTIONS),
    "transformed_block (dense path)+options": _transformed_block,
}


CAPABILITIES = (80, 90)


def compile_all() -> dict:
    """{kernel name: {capability: resource usage or error text}} for every kernel and target."""
    from triton.backends.compiler import GPUTarget

    results = {}
    for name, make in KERNELS.items():
        results[name] = {}
        for capability in CAPABILITIES:
            try:
                source, options = make()
                options = options if isinstance(options, dict) else {"num_warps": options}
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                          options={key: value for key, value in options.items() if value is not None})
                results[name][str(capability)] = _resource_usage(compiled)
            except Exception as error:  # reported by the test, with the kernel's name
                results[name][str(capability)] = f"{type(error).__name__}: {error}"[:4000]
    return results


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    print(json.dumps(compile_all()))
    sys.exit(0)


pytestmark = pytest.mark.skipif(
    not _has_cuda_backend() or not os.path.exists(CUOBJDUMP), reason="this triton has no CUDA backend / cuobjdump"
)


@pytest.fixture(scope="module")
def compiled():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=1800)
    assert run.returncode == 0, f"compilation process failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability", CAPABILITIES, ids=["sm80", "sm90"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_compiles_without_spills(compiled, name, capability):
    usage = compiled[name][str(capability)]
    assert isinstance(usage, dict), f"{name} does not compile for sm_{capability}: {usage}"
    print(f"\n{name} sm_{capability}: {usage}")
    # register spills go to the stack frame (ptxas -v: "N bytes stack frame, M bytes spill stores"),
    # local arrays to LOCAL: both live in local memory
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"{name} spills on sm_{capability}: {usage}"
