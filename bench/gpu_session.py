"""The GPU proof in one device command (``bash bench/gpu_session.sh all``; docs/gpu.md).

Steps, in priority order, each under its own time cap. The caps add up to at most
``BUDGET_S`` (7 minutes) by construction (``plan`` refuses more), and the deadlines are
cumulative: step i ends by start + cap_1 + ... + cap_i, so a step that finishes early leaves
its time to the next ones and none can push the session past the budget. A step past its
deadline is stopped (SIGTERM to its process group, SIGKILL ``KILL_GRACE_S`` later) and the
session goes on. Each step appends to the results folder as it goes, and ``summary.md`` is
written before the first step and rewritten after every step (bench/gpu_summary.py), so a
step that hangs or fails loses nothing written before it.

    bash bench/gpu_session.sh all                  # on a GPU machine: every step, at most 7 minutes
    bash bench/gpu_session.sh all --steps bench    # one step again (its own cap)
    bash bench/gpu_session.sh all --dry            # on CPU: tiny shapes, the Triton interpreter

The dry mode runs the same steps and the same scripts at tiny shapes on CPU tensors
(``TRITON_INTERPRET=1``), so that tests/test_gpu_session.py can check the plumbing and the
files in CI; none of its numbers means anything.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import gpu_summary  # noqa: E402

BUDGET_S = 420          # 7 minutes: the whole session, every step and every summary
KILL_GRACE_S = 3        # between SIGTERM and SIGKILL of a step past its deadline
SUMMARY_S = 2           # kept at the end of each step's share for rewriting summary.md
MIN_STEP_S = 5          # a step with less time than this left is skipped, not started

# The results folder holds these and nothing else (the device tool brings back at most 8 files).
FILES = gpu_summary.FILES
SUMMARY, STEPS_LOG, SESSION_LOG, DEVICE, CHECKS, BENCH, STAGES, LINEAR = FILES

# The benchmark shape of the issues: N = 8192, V = 50257, H = 768, K = 256, bfloat16, forward+backward.
BENCH_IMPLS = "seed-style,triton,liger+embbag,ce-torch,ce-triton,ce-liger"
# The fused-linear rows at N = 16384 against Liger's fused linear CE, Cut Cross-Entropy and
# torch.nn.functional.linear_cross_entropy (torch >= 2.13; the row says when it is missing).
LINEAR_IMPLS = "linear-triton,matmul+triton,ce-linear-triton,ce-liger-flce,ce-cce,ce-matmul-torch,ce-torch-linear"
# The GPU tests the issue names (selection, 2**31, determinism, the allocator's 5 %) first; the rest later.
FIRST_TESTS = ("tests/test_triton.py", "tests/test_triton_memory.py")
LATER_TESTS_FIRST = ("tests/test_linear.py", "tests/test_agreement.py", "tests/test_inplace.py",
                     "tests/test_grad_in_forward.py", "tests/test_edge_cases.py", "tests/test_properties.py")


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    hidden: int
    topk: int
    dtype: str = "bfloat16"

    def args(self) -> list[str]:
        return ["--tokens", str(self.tokens), "--vocab", str(self.vocab), "--hidden", str(self.hidden),
                "--topk", str(self.topk), "--dtype", self.dtype]


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU run and the dry run: the device, the shapes and the repeats."""
    dry: bool
    device: str
    bench: Shape
    linear: Shape
    bench_repeats: tuple[int, int]        # (timed repeats, warm-up calls)
    linear_repeats: tuple[int, int]
    stage_repeats: int
    impl_timeout_s: int                    # bench/run.py --timeout: one implementation at most
    later_tests: tuple[str, ...] | None    # None: every other test file
    cap_scale: int = 1                     # the dry run's caps are larger: CPU under the interpreter, slow CI


GPU = Mode(dry=False, device="cuda", bench=Shape(8192, 50257, 768, 256), linear=Shape(16384, 50257, 768, 256),
           bench_repeats=(10, 2), linear_repeats=(5, 1), stage_repeats=10, impl_timeout_s=60, later_tests=None)
DRY = Mode(dry=True, device="cpu", bench=Shape(16, 256, 16, 8), linear=Shape(16, 256, 16, 8),
           bench_repeats=(1, 0), linear_repeats=(1, 0), stage_repeats=1, impl_timeout_s=120,
           later_tests=("tests/test_inplace.py",), cap_scale=4)


@dataclass
class Context:
    """Where a step writes, with what, and how long it has."""
    mode: Mode
    out: str
    python: str
    site: str
    time_left_s: float = 0.0
    env: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int
    about: str
    argv: Callable[[Context], list[str]]
    env: Callable[[Context], dict] = lambda ctx: {}


# --------------------------------------------------------------------------- the steps

def _setup(ctx: Context) -> list[str]:
    """The comparators' wheels from .whl/ (bash bench/gpu_session.sh wheels, here), then the GPU's state."""
    pip = (f"{shlex.quote(ctx.python)} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           f"--target {shlex.quote(ctx.site)} .whl/*.whl")
    script = (f"if compgen -G '.whl/*.whl' > /dev/null; then ls -l .whl; {pip} || exit 1; "
              "else echo 'no .whl/*.whl: the comparators (Liger-Kernel, cut-cross-entropy) will be unavailable'; fi; "
              "if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo 'no nvidia-smi here'; fi")
    return ["bash", "-c", script]


def _device(ctx: Context) -> list[str]:
    return [ctx.python, "bench/gpu_device.py", "--device", ctx.mode.device, "--json", ctx.path(DEVICE),
            *ctx.mode.bench.args()]


def _checks(ctx: Context) -> list[str]:
    return [ctx.python, "bench/gpu_checks.py", "--device", ctx.mode.device, "--out", ctx.path(CHECKS),
            "--time-limit", f"{max(1.0, ctx.time_left_s - 2):.0f}", *(["--dry"] if ctx.mode.dry else [])]


def _pytest(files: Callable[[Context], list[str]]) -> Callable[[Context], list[str]]:
    def argv(ctx: Context) -> list[str]:
        workers = ["-n", "4"] if importlib.util.find_spec("xdist") is not None and not ctx.mode.dry else []
        return [ctx.python, "-m", "pytest", "-m", "gpu", "-p", "bench.gpu_pytest", "-p", "no:cacheprovider",
                "-q", "-rfE", *workers, *files(ctx)]
    return argv


def _pytest_env(step: str) -> Callable[[Context], dict]:
    return lambda ctx: {"GPU_CHECKS_FILE": ctx.path(CHECKS), "GPU_CHECKS_STEP": step}


def _later_tests(ctx: Context) -> list[str]:
    if ctx.mode.later_tests is not None:
        return list(ctx.mode.later_tests)
    others = sorted(f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests"))
                    if name.startswith("test_") and name.endswith(".py"))
    first = [path for path in LATER_TESTS_FIRST if path in others]
    return first + [path for path in others if path not in first and path not in FIRST_TESTS]


def _run_py(shape: Callable[[Mode], Shape], impls: str, repeats: Callable[[Mode], tuple[int, int]], name: str):
    def argv(ctx: Context) -> list[str]:
        timed, warmup = repeats(ctx.mode)
        return [ctx.python, "bench/run.py", "--device", ctx.mode.device, *shape(ctx.mode).args(),
                "--mode", "fwd+bwd", "--impl", impls, "--repeats", str(timed), "--warmup", str(warmup),
                "--timeout", str(ctx.mode.impl_timeout_s), "--no-save", "--no-progress", "--json", ctx.path(name)]
    return argv


def _stages(ctx: Context) -> list[str]:
    shape = ctx.mode.bench
    return [ctx.python, "bench/stages.py", "--device", ctx.mode.device, "--tokens", str(shape.tokens),
            "--vocab", str(shape.vocab), "--hidden", str(shape.hidden), "--topk", str(shape.topk),
            "--dtype", shape.dtype, "--repeats", str(ctx.mode.stage_repeats), "--all-kernels", "--json", ctx.path(STAGES)]


STEPS = (
    Step("setup", 15, "the comparators' wheels installed from .whl/, nvidia-smi", _setup),
    Step("device", 25, "versions and device; copy bandwidth and the embedding_bag gather rate at the benchmark shape",
         _device),
    Step("checks", 90, "correctness on the device, check by check (bench/gpu_checks.py)", _checks),
    Step("tests", 45, "the GPU tests of tests/test_triton.py and tests/test_triton_memory.py",
         _pytest(lambda ctx: list(FIRST_TESTS)), _pytest_env("tests")),
    Step("bench", 120, "bench/run.py at N=8192 V=50257 H=768 K=256 bf16, forward+backward",
         _run_py(lambda mode: mode.bench, BENCH_IMPLS, lambda mode: mode.bench_repeats, BENCH)),
    Step("stages", 40, "bench/stages.py: each kernel of the default path (gradient in the forward)", _stages),
    Step("linear", 55, "the fused-linear rows at N=16384 against Liger, Cut Cross-Entropy and torch",
         _run_py(lambda mode: mode.linear, LINEAR_IMPLS, lambda mode: mode.linear_repeats, LINEAR)),
    Step("more-tests", 30, "the other GPU tests, for the time left", _pytest(_later_tests), _pytest_env("more-tests")),
)


def plan(steps=STEPS, names: list[str] | None = None, budget_s: int = BUDGET_S) -> list[Step]:
    """The steps to run, in order; their caps must fit the budget (that is what keeps the session within it)."""
    known = [step.name for step in steps]
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"--steps: unknown {unknown}; the steps are {known}")
    chosen = [step for step in steps if names is None or step.name in names]
    total = sum(step.cap_s for step in chosen)
    if total > budget_s:
        raise ValueError(f"the steps' caps add up to {total} s, over the {budget_s} s budget")
    return chosen


# --------------------------------------------------------------------------- running them

class Session:
    """Runs the steps one after the other, each by its cumulative deadline, and records everything."""

    def __init__(self, ctx: Context, steps: list[Step], budget_s: int = BUDGET_S, argv: list[str] | None = None):
        self.ctx, self.steps, self.budget_s = ctx, steps, budget_s
        self.argv = argv or []
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def record(self, entry: dict) -> None:
        with open(self.ctx.path(STEPS_LOG), "a") as out:
            out.write(json.dumps(entry) + "\n")

    def log(self, text: str) -> None:
        with open(self.ctx.path(SESSION_LOG), "a") as out:
            out.write(text + "\n")

    def summarize(self) -> None:
        try:
            gpu_summary.write(self.ctx.out)
        except Exception as error:  # the summary must never stop the session
            self.log(f"[session] summary.md not rewritten: {type(error).__name__}: {error}")

    def run(self) -> int:
        os.makedirs(self.ctx.out, exist_ok=True)
        for name in FILES:
            if os.path.exists(self.ctx.path(name)):
                os.remove(self.ctx.path(name))
        self.summarize()        # the first file, before anything can go wrong
        self.record({"kind": "session", "dry": self.ctx.mode.dry, "device": self.ctx.mode.device,
                     "budget_s": self.budget_s, "caps": {step.name: step.cap_s for step in self.steps},
                     "about": {step.name: step.about for step in self.steps},
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "command": shlex.join(["bash", "bench/gpu_session.sh", "all", *self.argv]),
                     "python": self.ctx.python})
        self.summarize()
        deadline = 0.0
        failed = 0
        for step in self.steps:
            deadline += step.cap_s
            status = self.run_step(step, deadline)
            failed += status not in ("ok",)
            self.summarize()
            print(f"[{self.elapsed():5.0f} s] {step.name}: {status}", flush=True)
        for name in os.listdir(self.ctx.out):   # a write cut off by a deadline may leave one behind
            if name.endswith(".tmp"):
                os.remove(self.ctx.path(name))
        return 0 if failed == 0 else 1

    def run_step(self, step: Step, deadline: float) -> str:
        left = deadline - self.elapsed() - SUMMARY_S - KILL_GRACE_S
        base = {"kind": "step", "step": step.name, "cap_s": step.cap_s}
        if left < MIN_STEP_S:
            self.record({**base, "status": "skipped", "detail": f"{max(left, 0):.0f} s left of its share",
                         "t_s": round(self.elapsed(), 1)})
            return "skipped"
        self.ctx.time_left_s = left
        try:
            argv = step.argv(self.ctx)
            env = {**os.environ, **self.ctx.env, **step.env(self.ctx)}
        except Exception as error:
            self.record({**base, "status": "failed", "detail": f"could not start: {type(error).__name__}: {error}",
                         "t_s": round(self.elapsed(), 1)})
            return "failed"
        self.record({**base, "status": "started", "timeout_s": round(left, 1), "t_s": round(self.elapsed(), 1),
                     "command": shlex.join(argv)})
        self.log(f"\n===== [{self.elapsed():.0f} s] step {step.name} (at most {left:.0f} s): {shlex.join(argv)}")
        started = time.monotonic()
        rc, timed_out = run_with_deadline(argv, env, self.ctx.path(SESSION_LOG), left)
        wall = time.monotonic() - started
        status = "timed out" if timed_out else "ok" if rc == 0 else "failed"
        detail = f"stopped after {left:.0f} s (its deadline)" if timed_out else f"exit status {rc}"
        self.record({**base, "status": status, "rc": rc, "wall_s": round(wall, 1), "detail": detail,
                     "t_s": round(self.elapsed(), 1)})
        self.log(f"===== step {step.name}: {status} ({detail}) in {wall:.1f} s")
        return status


def run_with_deadline(argv: list[str], env: dict, log_path: str, timeout_s: float) -> tuple[int | None, bool]:
    """Run ``argv`` in its own process group, output appended to ``log_path``; past ``timeout_s`` the
    whole group (the benchmark's workers, pytest's) gets SIGTERM, then SIGKILL. -> (exit status, timed out)."""
    with open(log_path, "a") as log:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            log.write(f"cannot start {argv[0]}: {error}\n")
            return None, False
        try:
            code = proc.wait(timeout=timeout_s)
            _signal_group(proc, signal.SIGKILL)   # whatever it left running must not overlap the next step
            return code, False
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)   # also whatever of the group outlived its leader
            return proc.wait(), True
        finally:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- entry point

def default_out(dry: bool) -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    if dry:
        return os.path.join(os.environ.get("TMPDIR", "/tmp"), "fused_cosloss_gpu_session_dry")
    return os.path.join(ROOT, "bench", "results", "gpu-session")


def environment(mode: Mode, site: str) -> dict:
    """What every step runs with: the repository and the wheels on the path, no native build; the
    interpreter on CPU in the dry mode, never on the GPU."""
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, site, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "FUSED_COSLOSS_DISABLE_NATIVE": "1",
    }
    if mode.dry:
        env.update(TRITON_INTERPRET="1", FUSED_COSLOSS_BENCH_INTERPRETER="1")
    else:
        env["TRITON_CACHE_DIR"] = os.environ.get("TRITON_CACHE_DIR") or "/tmp/fused_cosloss_triton_cache"
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, the Triton interpreter")
    parser.add_argument("--steps", default=None, help="comma-separated subset of: " + ", ".join(s.name for s in STEPS))
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else bench/results/gpu-session)")
    args = parser.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_SESSION_DRY", "") not in ("", "0")
    mode = DRY if dry else GPU
    try:
        steps = plan(names=args.steps.split(",") if args.steps else None)
    except ValueError as error:
        parser.error(str(error))
    out = os.path.abspath(args.out or default_out(dry))
    site = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fused_cosloss_site{'_dry' if dry else ''}")
    ctx = Context(mode=mode, out=out, python=sys.executable, site=site)
    ctx.env = {key: value for key, value in environment(mode, site).items()}
    if not dry:
        os.environ.pop("TRITON_INTERPRET", None)
    steps = [replace(step, cap_s=step.cap_s * mode.cap_scale) for step in steps]
    print(f"GPU session{' (DRY RUN: CPU, tiny shapes)' if dry else ''}: {len(steps)} steps, at most "
          f"{sum(step.cap_s for step in steps)} s; results in {out}", flush=True)
    session = Session(ctx, steps, budget_s=BUDGET_S * mode.cap_scale, argv=argv)
    code = session.run()
    try:   # last, so that the end of the output (all a device call's reply may carry) holds the verdicts
        print("\n" + gpu_summary.headline(out))
    except Exception as error:  # noqa: BLE001
        print(f"no headline: {type(error).__name__}: {error}")
    return code


if __name__ == "__main__":
    sys.exit(main())
