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


# --------------------------------------------------------------------------- loss options (--softcap, --z-loss, ...)

OPTIONS_FLAGS = ["--softcap", "30", "--z-loss", "1e-4"]
OPTIONS = {"softcap": 30.0, "z_loss": 1e-4}
OPTIONS_IMPLS = ["seed-style", "reference", "native", "selftest-ignores-options"]


def _in_process_worker(task, conf, timeout, on_event):
    """bench/run.py's workers run here instead of in subprocesses (seconds instead of a minute); the
    configuration still goes through JSON as it does to a subprocess."""
    from bench import worker
    conf = json.loads(json.dumps(conf))
    return worker.probe(conf) if task == "probe" else worker.run_impl(conf)


@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
    """A tiny run with --softcap 30 --z-loss 1e-4, the reference, native (if it builds here) and an
    implementation that drops the options (right plain, wrong with them)."""
    import contextlib
    import io

    from bench import impls, run

    out = tmp_path_factory.mktemp("bench_options")
    paths = {"json": out / "options.json", "markdown": out / "options.md"}
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(impls.IMPLS, "selftest-ignores-options", impls.Impl(
            "selftest-ignores-options", "mixed", "drops the options", impls._build_ignoring_options,
            takes_options=True))
        patch.setattr(run, "run_worker", _in_process_worker)
        with contextlib.redirect_stdout(stdout):
            code = run.main(["--device", "cpu", "--vocab", "1000", "--hidden", "32", "--tokens", "16", "--topk", "8",
                             "--repeats", "1", "--no-memory", "--impl", ",".join(OPTIONS_IMPLS), *OPTIONS_FLAGS,
                             "--no-save", "--no-progress", "--json", str(paths["json"]),
                             "--markdown", str(paths["markdown"])])
    assert code == 0, stdout.getvalue()[-3000:]
    return json.loads(paths["json"].read_text()), stdout.getvalue(), paths


def _rows(data: dict, impl: str) -> tuple[list[dict], list[dict]]:
    """(plain rows, options rows) of one implementation."""
    rows = [row for row in data["results"] if row["impl"] == impl]
    return [row for row in rows if not row.get("options")], [row for row in rows if row.get("options")]


def test_options_rows_sit_beside_the_plain_rows_with_their_ratio(options_run):
    data, stdout, paths = options_run
    assert data["config"]["options"] == OPTIONS
    ran = [name for name in ("reference", "native") if name not in data["unavailable"]]
    assert "reference" in ran
    for name in ran:
        (plain,), (with_options,) = _rows(data, name)
        assert plain["status"] == with_options["status"] == "ok", (plain, with_options)
        assert with_options["options"] == OPTIONS
        assert with_options["label"] == f"{name} +softcap=30,z_loss=1e-4"
        assert data["results"].index(with_options) == data["results"].index(plain) + 1
        for mode in ("fwd", "fwd+bwd"):
            stats = with_options["modes"][mode]
            assert stats["vs_plain"] == pytest.approx(stats["median_ms"] / plain["modes"][mode]["median_ms"])
            assert "speedup" not in stats and "vs_plain" not in plain["modes"][mode]
            assert plain["modes"][mode]["speedup_vs"] == "seed-style"
        assert f"{name} +softcap=30,z_loss=1e-4" in stdout
    assert "vs plain" in stdout
    assert "| N | impl | check | mode | median ms | p20-p80 ms | x floor | speedup | vs plain | extra MB |" \
        in paths["markdown"].read_text()


def test_outside_implementations_get_no_options_row(options_run):
    data, _, _ = options_run
    plain, with_options = _rows(data, "seed-style")
    assert len(plain) == 1 and plain[0]["status"] == "ok" and not with_options


def test_options_rows_are_checked_against_the_reference_with_the_options(options_run):
    """The native options row's reference loss is mixed_loss with the options on the same inputs
    (computed here independently), not the plain one."""
    from bench.inputs import make_embedding, make_set
    from fused_cosloss import mixed_loss

    data, _, _ = options_run
    if "native" in data["unavailable"]:
        pytest.skip(f"native unavailable: {data['unavailable']['native']}")
    (plain,), (with_options,) = _rows(data, "native")
    inputs = make_set("logits", 16, 1000, 32, 8, torch.float32, "cpu", seed=0, index=0)
    embedding = make_embedding(1000, 32, torch.float32, "cpu", seed=0)
    expected = {key: float(mixed_loss(inputs["logits"], inputs["labels"], embedding, alpha=0.5, topk=8,
                                      backend="reference", **options))
                for key, options in (("plain", {}), ("options", OPTIONS))}
    assert expected["options"] != pytest.approx(expected["plain"], rel=1e-4)
    assert with_options["check"]["loss_ref"] == pytest.approx(expected["options"], rel=1e-6)
    assert plain["check"]["loss_ref"] == pytest.approx(expected["plain"], rel=1e-6)
    assert with_options["check"]["passed"]


def test_an_implementation_that_drops_the_options_is_wrong_on_its_options_row(options_run):
    data, stdout, _ = options_run
    (plain,), (with_options,) = _rows(data, "selftest-ignores-options")
    assert plain["status"] == "ok" and plain["check"]["passed"]
    assert with_options["status"] == "WRONG" and not with_options["check"]["passed"]
    assert "modes" not in with_options
    assert "selftest-ignores-options +softcap=30,z_loss=1e-4: WRONG" in stdout


def test_plain_run_has_no_options_rows(tiny_run):
    data, stdout, paths = tiny_run
    assert "options" not in data["config"]
    assert not [row for row in data["results"] if "options" in row or "label" in row]
    assert not [stats for row in data["results"] for stats in (row.get("modes") or {}).values() if "vs_plain" in stats]
    assert "vs plain" not in stdout and "loss options" not in stdout
    assert "vs plain" not in paths["markdown"].read_text()


@pytest.mark.parametrize("flags, message", [
    (["--softcap", "0"], "--softcap must be a finite number > 0"),
    (["--logit-scale", "-1"], "--logit-scale must be a finite number > 0"),
    (["--softcap", "inf"], "--softcap must be a finite number > 0"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1]"),
    (["--z-loss=-1e-4"], "--z-loss must be a finite number >= 0"),
])
def test_bad_loss_options_are_refused(flags, message, capsys):
    from bench import run
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_loss_options_flags_and_names():
    from bench import report, run
    assert run.parse_args(["--device", "cpu"]).options == {}
    assert run.parse_args(["--device", "cpu", "--z-loss", "0", "--label-smoothing", "0"]).options == {}
    args = run.parse_args(["--device", "cpu", "--z-loss", "1e-4", "--label-smoothing", "0.1", "--softcap", "30",
                           "--logit-scale", "0.5"])
    assert list(args.options.items()) == [("logit_scale", 0.5), ("softcap", 30.0), ("label_smoothing", 0.1),
                                          ("z_loss", 1e-4)]
    assert report.options_label("native", {"softcap": 30.0, "z_loss": 1e-4}) == "native +softcap=30,z_loss=1e-4"
    machine = {"device": "cpu", "cpu_affinity": 2, "cpu_count": 2}
    assert run.stem(machine, {}) == "cpu-2core"
    assert run.stem(machine, {"softcap": 30.0, "z_loss": 1e-4}) == "options-softcap30-zloss1e-4-cpu-2core"
    for value in (30.0, 1e-4, 0.1, 1 / 3, 2.5e-3, 1e3, 1.5e20):
        assert float(report.short_number(value)) == value


def test_worker_refuses_options_for_an_implementation_that_does_not_take_them():
    from bench import worker
    conf = {"device": "cpu", "dtype": "float32", "vocab": 100, "hidden": 8, "topk": 4, "alpha": 0.5,
            "temperature": 1.0, "tokens": [4], "impl": "seed-style", "options": {"softcap": 30.0}}
    with pytest.raises(ValueError, match="seed-style does not take the loss options"):
        worker.run_impl(conf)
