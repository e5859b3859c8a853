"""bench/run.py in a tiny configuration, so the benchmark cannot silently rot.

It runs as users run it (a subprocess, workers and all) and checks the JSON it writes:
the machine and the floor are recorded, every implementation either ran and was checked
against the reference or says why it is unavailable, and a deliberately wrong
implementation is reported WRONG and not timed.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.check import compare  # noqa: E402

# compile-reference is left out: its torch.compile alone takes 15-30 s on 2 cores
TINY_IMPLS = ["seed-style", "reference", "native", "triton", "ce-torch", "ce-reference", "ce-native", "selftest-wrong"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, FUSED_COSLOSS_BENCH_SELFTEST="1")
    env.pop("TRITON_INTERPRET", None)   # tests/conftest.py sets it; the bench never times the interpreter
    paths = {"json": out / "cpu.json", "markdown": out / "cpu.md", "plot": out / "cpu.png"}
    cmd = [sys.executable, "bench/run.py", "--device", "cpu", "--vocab", "1000", "--hidden", "32", "--tokens", "16",
           "--topk", "8", "--repeats", "2", "--impl", ",".join(TINY_IMPLS), "--no-save", "--no-progress",
           "--json", str(paths["json"]), "--markdown", str(paths["markdown"]), "--plot", str(paths["plot"])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(paths["json"].read_text()), proc.stdout, paths


def test_records_machine_config_and_floor(tiny_run):
    data, _, _ = tiny_run
    assert {"meta", "machine", "config", "floor", "impls", "unavailable", "results"} <= data.keys()
    assert data["meta"]["command"].startswith("python bench/run.py --device cpu --vocab 1000")
    assert data["meta"]["date"] and "git_commit" in data["meta"]
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["device_name"] and machine["cpu_count"] >= 1
    assert machine["torch"] == torch.__version__
    assert "triton" in machine
    assert data["config"] == {"device": "cpu", "dtype": "float32", "vocab": 1000, "hidden": 32, "topk": 8,
                              "alpha": 0.5, "temperature": 1.0, "tokens": [16], "modes": ["fwd", "fwd+bwd"],
                              "repeats": 2, "warmup": 1, "seed": 0}
    floor = data["floor"]
    assert floor["copy_bytes_per_s"] > 0 and floor["exp_elems_per_s"] > 0
    assert {"fwd", "fwd+bwd", "text"} <= floor["formula"].keys()
    assert {(p["n_tokens"], p["mode"]) for p in floor["per_point"]} == {(16, "fwd"), (16, "fwd+bwd")}


def test_every_implementation_ran_checked_or_says_why_not(tiny_run):
    data, stdout, _ = tiny_run
    ran = {row["impl"] for row in data["results"]}
    assert ran | data["unavailable"].keys() == set(TINY_IMPLS)
    assert not ran & data["unavailable"].keys()
    assert {"seed-style", "reference", "ce-torch", "ce-reference"} <= ran      # always available
    assert "triton" in data["unavailable"]                                     # CPU: never the interpreter
    for name, reason in data["unavailable"].items():
        assert reason and f"{name}: unavailable: " in stdout
    for row in data["results"]:
        if row["impl"] == "selftest-wrong":
            continue
        assert row["status"] == "ok", row
        check = row["check"]
        assert check["passed"]
        if not check.get("oracle"):
            assert math.isfinite(check["loss_ref"]) and check["loss_rel_err"] <= check["tol_loss"]
            expected = {"logits", "embedding"} if row["group"] == "mixed" else {"logits"}
            assert check["grad_err"].keys() == expected
            assert all(err <= check["tol_grad"] for err in check["grad_err"].values())
        else:
            assert row["impl"] in ("reference", "ce-reference")
        assert row["modes"].keys() == {"fwd", "fwd+bwd"}
        for stats in row["modes"].values():
            assert len(stats["times_ms"]) == 2
            assert 0 < stats["min_ms"] <= stats["p20_ms"] <= stats["median_ms"] <= stats["p80_ms"] <= stats["max_ms"]
            assert stats["floor_ms"] > 0 and stats["over_floor"] > 0
            assert stats["speedup"] > 0 and stats["speedup_vs"] in ("seed-style", "ce-torch")
        if data["meta"]["cpu_peak_memory_unavailable"] is None:     # Linux: the peak RSS can be reset
            for stats in row["modes"].values():
                assert {"peak_bytes_above_inputs", "gradient_bytes", "extra_bytes"} <= stats.keys()
            assert row["modes"]["fwd+bwd"]["gradient_bytes"] > 0


def test_wrong_implementation_is_reported_and_not_timed(tiny_run):
    data, stdout, _ = tiny_run
    (row,) = [row for row in data["results"] if row["impl"] == "selftest-wrong"]
    assert row["status"] == "WRONG" and not row["check"]["passed"]
    assert "modes" not in row
    assert "WRONG" in stdout


def test_writes_markdown_and_plot(tiny_run):
    _, stdout, paths = tiny_run
    markdown = paths["markdown"].read_text()
    assert "| N | impl | check | mode |" in markdown and "seed-style" in markdown
    assert "median ms" in stdout and "floor" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_a_gradient_off_by_a_few_percent():
    ref = {"logits": torch.linspace(-1, 1, 100).reshape(10, 10)}
    assert compare(1.0, ref, 1.0, ref, torch.float32)["passed"]
    off = {"logits": ref["logits"] * 1.05}
    result = compare(1.0, off, 1.0, ref, torch.float32)
    assert not result["passed"] and result["grad_err"]["logits"] == pytest.approx(0.05, rel=1e-3)
    assert not compare(float("nan"), ref, 1.0, ref, torch.float32)["passed"]


@pytest.mark.parametrize("path", ["grad-in-forward", "backward"])
def test_stage_times_run_under_the_interpreter(tmp_path, path):
    """bench/stages.py (the per-kernel times a GPU session takes first) runs end to end: every
    stage of the path is timed, and the JSON says so."""
    pytest.importorskip("triton")
    out = tmp_path / "stages.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "bench/stages.py", "--device", "cpu", "--tokens", "4", "--vocab", "64", "--hidden", "16",
           "--topk", "4", "--repeats", "1", "--path", path, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {row["stage"]: row for row in json.loads(out.read_text())["stages"]}
    expected = {"row_stats_kernel", "cosine_kernel", "direction_chunk_kernel", "embedding_grad_kernel",
                "selected_grad_kernel", "_grouped_entries", "_target_segments", "total"}
    if path == "backward":
        expected.add("backward_rows_kernel")
    assert set(stages) == expected
    assert all(row["median_ms"] > 0 for row in stages.values())
    assert stages["total"]["median_ms"] >= max(row["median_ms"] for name, row in stages.items() if name != "total")


def test_train_step_times_every_variant_and_their_mixed_losses_agree(tmp_path):
    """bench/train_step.py on one layer of SmolLM2's shape: every variant timed, the three
    implementations of the mixed loss give the same loss on the same step, and the JSON is written."""
    pytest.importorskip("transformers")
    from bench import train_step

    out = tmp_path / "train_step.json"
    result = train_step.main(["--device", "cpu", "--layers", "1", "--batch", "1", "--seq", "16", "--repeats", "1",
                              "--json", str(out)])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == set(train_step.VARIANTS)
    assert all(row["median_ms"] > 0 and row["peak_bytes"] >= 0 for row in rows.values())
    assert rows["ce-hf"]["vs_ce_hf"] == 1.0
    mixed = [rows[name]["loss"] for name in ("seed-style", "mixed", "mixed-linear")]
    assert max(mixed) - min(mixed) <= 1e-4 * abs(mixed[0])
    assert abs(mixed[0] - rows["ce-hf"]["loss"]) > 1e-3  # alpha = 0.5: not the cross-entropy alone
    assert json.loads(out.read_text())["rows"][0]["variant"] == "ce-hf"
