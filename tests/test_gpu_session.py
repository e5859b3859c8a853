"""The GPU session (``bash bench/gpu_session.sh all``, docs/gpu.md) cannot rot.

Its dry mode runs every step on CPU at tiny shapes under the Triton interpreter, through the same
scripts as on a GPU: the test checks each step's status, the files (at most 8, the summary listing
every step) and what each file holds. The rest checks the parts a dry run cannot show: the steps'
caps fit the 7-minute budget, a step that hangs is stopped at its deadline and the session goes
on (with the time of the steps before it), the summary reads partial files, the pytest plugin
records each test, and bench/run.py keeps the implementations that ran before it was stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_session, gpu_summary  # noqa: E402
from bench.gpu_checks import DRY, unit_names  # noqa: E402
from conftest import backend_or_skip  # noqa: E402

FILES = set(gpu_summary.FILES)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session")
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "GPU_SESSION_DRY")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    started = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "all", "--dry"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    wall = time.monotonic() - started
    log = (out / "session.log").read_text() if (out / "session.log").exists() else ""
    return out, proc, wall, log


def test_dry_run_every_step_ok_and_the_planned_files(dry_run):
    out, proc, wall, log = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-6000:]
    assert set(os.listdir(out)) == FILES and len(FILES) <= 8
    records = _lines(out / "steps.jsonl")
    session = records[0]
    assert session["kind"] == "session" and session["dry"] is True and session["device"] == "cpu"
    names = [step.name for step in gpu_session.STEPS]
    assert list(session["caps"]) == names
    final = {r["step"]: r for r in records if r["kind"] == "step"}
    assert {name: final[name]["status"] for name in names} == {name: "ok" for name in names}, log[-6000:]
    print(f"\ndry session: {wall:.0f} s; " + ", ".join(f"{n} {final[n]['wall_s']:.0f} s" for n in names))


def test_dry_run_summary_lists_every_step_and_section(dry_run):
    out, proc, _, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU session") and "**DRY RUN**" in summary
    for step in gpu_session.STEPS:
        assert f"| {step.name} | {step.cap_s * gpu_session.DRY.cap_scale} | ok |" in summary
    for section in ("## Steps", "## Device and versions", "## Targets", "## Checks on the device", "## GPU tests",
                    "## Benchmark (bench.json)", "## Stages", "## Fused-linear rows (linear.json)", "## Files"):
        assert section in summary, section
    for target in ("10x faster than seed-style", "faster than Liger CE + embedding_bag", "within 1.3x of the floor",
                   "ce-triton at least as fast as Liger CE", "5 % of the logits", "5x lower than the logits path"):
        assert target in summary, target
    # printed last, short enough for the end of the output a device call's reply carries (12,000 characters)
    tail = proc.stdout[proc.stdout.index("# GPU session"):]
    assert len(tail) < 12_000 and "## Targets" in tail and "| bench | 480 | ok |" in tail
    assert "## Checks that did not pass" in tail and "extra memory, backward" in tail   # the dry run's memory fails


def test_dry_run_device_json(dry_run):
    out, _, _, _ = dry_run
    device = json.loads((out / "device.json").read_text())
    assert device["versions"]["torch"] == torch.__version__ and device["machine"]["device"] == "cpu"
    assert device["shape"] == {"tokens": 16, "vocab": 256, "hidden": 16, "topk": 8, "dtype": "bfloat16"}
    assert device["copy_bytes_per_s"] > 0 and device["gather"]["bytes_per_s"] > 0
    assert device["gather"]["bytes"] == 16 * 8 * 16 * 2
    floor = device["floor"]
    assert floor["total_ms"] == pytest.approx(floor["logits_ms"] + floor["gathers_ms"])
    assert floor["logits_ms"] == pytest.approx(2 * 16 * 256 * 2 / device["copy_bytes_per_s"] * 1e3)


def test_dry_run_checks_every_unit_to_the_end(dry_run):
    out, _, _, _ = dry_run
    records = _lines(out / "checks.jsonl")
    groups = [r for r in records if r["kind"] == "unit" and r["status"] != "started"]
    assert groups and all(r["status"] == "done" for r in groups), groups
    assert sorted(u for r in groups for u in r["unit"].split(",")) == sorted(unit_names(DRY))
    checks = {(r["unit"], r["name"]): r for r in records if r["kind"] == "check"}
    assert {unit for unit, _ in checks} == set(unit_names(DRY))
    for (unit, name), record in checks.items():
        assert record["status"] in ("pass", "fail", "skipped"), record      # never an exception, never unfinished
        assert record["target"] and record["dry"] is True
        if record["status"] != "skipped":
            assert record["text"] and record["measured"], record
        if unit != "memory":   # the extra memory at 16 x 256 is not 5 % of anything: measured, not judged here
            assert record["status"] == "pass", record
    selection = [r for (unit, _), r in checks.items() if unit.startswith("selection-")]
    assert len(selection) == 2 * len(DRY.select_vocabs) * len(DRY.select_ks)
    assert all(r["measured"]["rows_wrong"] == 0 and r["measured"]["values_exact"] for r in selection)
    memory = [r for (unit, _), r in checks.items() if unit == "memory"]
    assert len(memory) == 3 and all(r["measured"]["extra_bytes"] is not None for r in memory if r["status"] != "skipped")


def test_dry_run_pytest_steps_record_each_test(dry_run):
    out, _, _, _ = dry_run
    tests = [r for r in _lines(out / "checks.jsonl") if r["kind"] == "pytest"]
    done = [r for r in tests if r["status"] != "started"]
    assert {r["step"] for r in done} == {"tests", "more-tests"}
    assert len(done) == len(tests) / 2          # each test: started, then its outcome
    assert any("test_cuda_more_than_2_pow_31_logits" in r["name"] for r in done)
    assert all(r["status"] == "skipped" and "CUDA" in r["detail"] for r in done)   # -m gpu on a CPU


def test_dry_run_benchmark_stages_and_linear(dry_run):
    out, _, _, _ = dry_run
    bench = json.loads((out / "bench.json").read_text())
    assert bench["meta"]["partial"] is False and bench["config"]["tokens"] == [16]
    rows = {row["impl"]: row for row in bench["results"]}
    for name in ("seed-style", "triton", "ce-triton"):   # the triton rows under the interpreter
        assert rows[name]["status"] == "ok" and rows[name]["modes"]["fwd+bwd"]["median_ms"] > 0, rows[name]
    assert bench["unavailable"] == {"liger+embbag": "CUDA only", "ce-liger": "CUDA only"}
    stages = json.loads((out / "stages.json").read_text())
    assert {row["stage"] for row in stages["stages"]} >= {"row_stats_kernel", "cosine_kernel", "embedding_grad_kernel",
                                                          "total"}
    linear = json.loads((out / "linear.json").read_text())
    rows = {row["impl"]: row for row in linear["results"]}
    for name in ("linear-triton", "matmul+triton", "ce-linear-triton"):
        assert rows[name]["status"] == "ok", rows[name]
    assert "ce-torch-linear" in rows or "linear_cross_entropy" in linear["unavailable"]["ce-torch-linear"]


# --------------------------------------------------------------------------- what a dry run cannot show

def test_the_caps_fit_the_budget_by_construction():
    steps = gpu_session.plan()
    assert [step.name for step in steps] == ["setup", "device", "checks", "tests", "bench", "stages", "linear",
                                             "more-tests"]
    assert sum(step.cap_s for step in steps) <= gpu_session.BUDGET_S == 420
    assert [step.name for step in gpu_session.plan(names=["bench", "setup"])] == ["setup", "bench"]
    too_long = gpu_session.STEPS + (gpu_session.Step("extra", 60, "", lambda ctx: ["true"]),)
    with pytest.raises(ValueError, match="over the 420 s budget"):
        gpu_session.plan(too_long)
    with pytest.raises(ValueError, match="unknown"):
        gpu_session.plan(names=["nope"])


def _fake_session(tmp_path, steps, budget_s):
    ctx = gpu_session.Context(mode=gpu_session.DRY, out=str(tmp_path), python=sys.executable, site=str(tmp_path))
    return gpu_session.Session(ctx, steps, budget_s=budget_s)


def _python_step(name: str, cap: int, code: str):
    return gpu_session.Step(name, cap, name, lambda ctx: [sys.executable, "-c", code])


def test_a_hung_step_is_stopped_at_its_deadline_and_the_session_goes_on(tmp_path):
    marker = tmp_path / "grandchild.txt"
    # the hung step's child starts a grandchild that would write the marker later: the whole group goes
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(14)\nopen({str(marker)!r}, 'w').write('late')\n")
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); time.sleep(60)"
    steps = [_python_step("first", 12, "print('first ran')"),
             _python_step("hangs", 4, hang),
             _python_step("after", 12, "print('after ran')")]
    started = time.monotonic()
    code = _fake_session(tmp_path, steps, 28).run()
    wall = time.monotonic() - started
    assert code == 1
    final = {r["step"]: r for r in _lines(tmp_path / "steps.jsonl") if r["kind"] == "step"}
    assert final["first"]["status"] == "ok" and final["after"]["status"] == "ok"
    assert final["hangs"]["status"] == "timed out"
    # the hung step ran past its own 4 s cap on what "first" left of its 12 s; the whole session kept to its 28 s
    assert final["hangs"]["wall_s"] > 4 and wall < 28
    log = (tmp_path / "session.log").read_text()
    assert "first ran" in log and "after ran" in log
    summary = (tmp_path / "summary.md").read_text()
    assert "| hangs | 4 | timed out" in summary and "| after | 12 | ok |" in summary
    time.sleep(max(0.0, 16 - (time.monotonic() - started)))
    assert not marker.exists(), "the hung step's grandchild outlived the step"


def test_no_step_starts_without_time_left(tmp_path):
    steps = [_python_step("slow", 12, "import time; time.sleep(60)"), _python_step("late", 4, "print('late ran')")]
    _fake_session(tmp_path, steps, 16).run()
    final = {r["step"]: r for r in _lines(tmp_path / "steps.jsonl") if r["kind"] == "step"}
    assert final["slow"]["status"] == "timed out"
    # "late" gets only its own 4 s cap, less the summary's and the kill's share: too little to start
    assert final["late"]["status"] == "skipped"
    assert "late ran" not in (tmp_path / "session.log").read_text()


def test_summary_reads_partial_and_unfinished_results(tmp_path):
    (tmp_path / "steps.jsonl").write_text(json.dumps({"kind": "session", "dry": False, "caps": {"checks": 90,
                                                      "bench": 120}, "about": {}, "budget_s": 420}) + "\n"
                                          + json.dumps({"kind": "step", "step": "checks", "status": "started",
                                                        "timeout_s": 85}) + "\n")
    (tmp_path / "checks.jsonl").write_text(
        json.dumps({"kind": "check", "unit": "memory", "name": "extra memory X", "target": "t", "status": "started"})
        + "\n" + json.dumps({"kind": "pytest", "step": "tests", "name": "tests/t.py::a", "status": "fail",
                             "detail": "AssertionError: boom"}) + "\n" + '{"kind": "check", "cut')
    (tmp_path / "bench.json").write_text('{"meta": {"partial": tr')
    text = gpu_summary.render(str(tmp_path))
    assert "| checks | 90 | running (or cut off), at most 85 s |" in text
    assert "| bench | 120 | pending |" in text
    assert "| extra memory X | DID NOT FINISH |" in text
    assert "`tests/t.py::a`: fail: AssertionError: boom" in text
    assert "Unreadable: JSONDecodeError" in text
    assert "device.json: not written" in text
    assert "| triton at least 10x faster than seed-style (issue 3) | result file unreadable" in text


def test_pytest_plugin_records_each_test_as_it_ends(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    print('measured 1.5 MB')\n"
        "def test_bad():\n    assert 1 == 2\n"
        "def test_skip():\n    pytest.skip('no CUDA device')\n")
    records_path = tmp_path / "records.jsonl"
    env = dict(os.environ, GPU_CHECKS_FILE=str(records_path), GPU_CHECKS_STEP="tests",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.gpu_pytest", "-p", "no:cacheprovider", "-q",
                           "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout
    records = _lines(records_path)
    assert [(r["name"].split("::")[1], r["status"]) for r in records] == [
        ("test_ok", "started"), ("test_ok", "pass"), ("test_bad", "started"), ("test_bad", "fail"),
        ("test_skip", "started"), ("test_skip", "skipped")]
    by_name = {r["name"].split("::")[1]: r for r in records if r["status"] != "started"}
    assert by_name["test_ok"]["printed"] == "measured 1.5 MB"
    assert "assert 1 == 2" in by_name["test_bad"]["detail"]
    assert by_name["test_skip"]["detail"] == "Skipped: no CUDA device"
    assert all(r["kind"] == "pytest" and r["step"] == "tests" for r in records)


def test_bench_run_keeps_what_ran_before_it_was_stopped(tmp_path, monkeypatch):
    """bench/run.py rewrites --json after every implementation: stopped during the second one, the
    first is in the file (marked partial)."""
    from bench import measure, run

    floor = {"copy_bytes_per_s": 1e10, "exp_elems_per_s": 1e9, "exp_elems_per_s_one_thread": 1e9, "exp_threads": 1,
             "formula": measure.FLOOR_FORMULA["cpu"]}
    machine = {"device": "cpu", "device_name": "test", "cpu_count": 1, "cpu_affinity": 1, "torch_threads": 1,
               "torch": torch.__version__, "triton": None, "cache_bytes": 1 << 20}

    class Stopped(RuntimeError):
        pass

    def fake_worker(task, conf, timeout, on_event):
        if task == "probe":
            return {"machine": machine, "floor": floor, "availability": {n: None for n in conf["impls"]},
                    "cpu_peak_memory": None}
        if conf["impl"] != "seed-style":
            raise Stopped("stopped at its deadline")
        stats = measure.summarize([2.0, 3.0])
        return {"impl": "seed-style", "points": [{"n_tokens": 16, "status": "ok", "check": {"passed": True},
                                                  "modes": {"fwd+bwd": stats}}]}

    monkeypatch.setattr(run, "run_worker", fake_worker)
    path = tmp_path / "bench.json"
    with pytest.raises(Stopped):
        run.main(["--device", "cpu", "--tokens", "16", "--impl", "seed-style,reference", "--mode", "fwd+bwd",
                  "--no-save", "--no-progress", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["partial"] is True
    assert [row["impl"] for row in data["results"]] == ["seed-style"]
    assert data["results"][0]["modes"]["fwd+bwd"]["median_ms"] == 2.5
    assert not (tmp_path / "bench.json.tmp").exists()


def test_stages_times_the_interpreters_tiles_and_every_kernel(monkeypatch):
    """bench/stages.py wraps the kernels to time them; the backend must still see that it runs under
    the interpreter (else it takes the GPU's one-row tiles there: the dry session's stages step ran
    20 times longer). With --all-kernels (the session's) every kernel a run launches has its row: the
    sparse backward path and the dense one with a soft-cap launch every kernel of the backend between them."""
    backend_or_skip("triton", "cpu")
    import fused_cosloss.triton_ops as ops
    from bench import stages
    from fused_cosloss.triton_ops import tiles as launch_tiles
    from fused_cosloss.triton_ops.config import CONFIG

    seen = []
    tiles = launch_tiles.rows_per_step
    monkeypatch.setattr(launch_tiles, "rows_per_step",
                        lambda *args: (seen.append(launch_tiles.interpreter_blocks()), tiles(*args))[1])
    common = ["--device", "cpu", "--tokens", "4", "--vocab", "64", "--hidden", "16", "--topk", "4",
              "--repeats", "1", "--path", "backward", "--all-kernels"]

    def timed_kernels(extra):
        return {row["stage"] for row in stages.run(stages.parse_args(common + extra))
                if row["stage"].endswith("_kernel")}

    sparse = timed_kernels([])
    assert seen and all(seen)
    assert sparse >= set(stages.KERNELS)
    monkeypatch.setattr(CONFIG, "sparse_max_k", 2)     # k = 4 takes the dense path
    dense_capped = timed_kernels(["--softcap", "5"])
    assert "transformed_block_kernel" in dense_capped - sparse
    assert sparse | dense_capped == set(stages.other_kernels(ops))
    assert launch_tiles.rows_per_step is not tiles and launch_tiles.interpreted() is True     # restored after the run
