"""The experiment harness of issue #14: the geometry and gradient norms every run records in
metrics.json, and the resumable grid (python -m fused_cosloss.grid) on the built-in tiny model."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from fused_cosloss import grid  # noqa: E402
from fused_cosloss.geometry import embedding_geometry, split_by_seen  # noqa: E402

FAST = ["--max_steps", "2", "--logging_steps", "1", "--per_device_eval_batch_size", "64", "--disable_tqdm"]


def _read(path):
    return json.loads(path.read_text())


# ---- what a run records ---------------------------------------------------------------------------

def test_run_records_geometry_of_its_initial_and_trained_table(tmp_path):
    """geometry before/after equal embedding_geometry computed here on the initial model (rebuilt the same
    way, same seed) and the trained one, split by the training split's ids; grad_norms is the probe's log."""
    from fused_cosloss import experiment
    from fused_cosloss.text_data import load_raw_splits
    from fused_cosloss.train_args import parse_args
    from fused_cosloss.train_env import LoadProbe

    argv = [*grid.TINY_ARGS, "--alpha", "0.5", "--seed", "3", "--output_dir", str(tmp_path / "run"),
            "--eval_pretrained", "false", *FAST]
    args = parse_args(argv)
    prepared = {"raw": load_raw_splits(args.data, args.training.seed), "temperatures": [1.0], "load": LoadProbe(1)}
    initial = experiment.prepare_run(args, 0.5, 1.0, str(tmp_path / "unused"), prepared)
    table0 = initial.trainer.model.get_input_embeddings().weight.detach().clone()
    seen = torch.tensor(list(itertools.chain.from_iterable(initial.data["train"]["input_ids"])))
    groups = split_by_seen(table0.shape[0], seen)
    assert groups["seen"].numel() > 1 and groups["unseen"].numel() > 1

    metrics, trained = experiment.train_run(args, 0.5, 1.0, str(tmp_path / "run"), prepared)
    assert metrics["geometry"]["before"] == embedding_geometry(table0, groups)
    table1 = trained.trainer.model.get_input_embeddings().weight.detach()
    after = embedding_geometry(table1, groups, before=table0)
    assert metrics["geometry"]["after"] == after
    assert after["seen"]["relative_change"] > 0 and after["unseen"]["relative_change"] > 0
    logged = [e for e in trained.trainer.state.log_history if "grad_norm_ce" in e]
    assert len(logged) == 2
    assert metrics["grad_norms"] == [{"step": e["step"], "grad_norm_ce": e["grad_norm_ce"],
                                      "grad_norm_cos": e["grad_norm_cos"]} for e in logged]
    assert _read(tmp_path / "run" / "metrics.json")["geometry"] == metrics["geometry"]


def test_evaluation_only_records_no_change(tmp_path):
    """--do_train false: the geometry of the table as loaded, before and after the same sample, change 0."""
    from fused_cosloss import train

    train.main([*grid.TINY_ARGS, "--do_train", "false", "--output_dir", str(tmp_path), *FAST])
    geometry = _read(tmp_path / "metrics.json")["geometry"]
    for group in ("seen", "unseen"):
        after = dict(geometry["after"][group])
        assert after.pop("relative_change") == 0.0
        assert after == geometry["before"][group]


def test_geometry_record_uses_one_sample_before_and_after():
    """Groups larger than the sample: before and after are measured on the same rows, drawn with seed 0."""
    from fused_cosloss import experiment
    from fused_cosloss.geometry import SAMPLE_SIZE, mean_pairwise_cosine, relative_change, token_sample

    g = torch.Generator().manual_seed(0)
    vocab = 2 * SAMPLE_SIZE + 1500
    before = torch.randn(vocab, 8, generator=g)
    after = before + 0.1 * torch.randn(vocab, 8, generator=g) + 0.3
    groups = split_by_seen(vocab, torch.arange(0, vocab, 2))
    record = experiment.geometry_record(before, after, groups)
    for name, ids in groups.items():
        rows = token_sample(ids, SAMPLE_SIZE, 0)
        assert ids.numel() > SAMPLE_SIZE and record["after"][name]["sample"] == SAMPLE_SIZE
        assert record["before"][name]["mean_pairwise_cosine"] == mean_pairwise_cosine(before[rows])
        assert record["after"][name]["mean_pairwise_cosine"] == mean_pairwise_cosine(after[rows])
        assert record["after"][name]["relative_change"] == relative_change(before[rows], after[rows])


# ---- the grid -----------------------------------------------------------------------------------

def _value(metrics, key):
    section, name = grid.RUN_VALUES[key]
    return metrics[section][name]


def test_variants_take_their_turn_in_each_seed():
    """The remedies at one setting (variants with their own alphas and learning rates) are interleaved by
    seed with the grid: a grid stopped part-way has the remedies' first seed too."""
    spec = dict(grid.load_spec("tiny"), variants={"": [], "detach": {"args": ["--detach_cos_embedding", "true"],
                                                                     "alphas": [0.5], "learning_rates": [5e-4]}})
    runs = grid.grid_runs(grid.check_spec(spec, "remedies"))
    assert len(runs) == 27 and [run.seed for run in runs] == [0] * 9 + [1] * 9 + [2] * 9
    assert [run.name for run in runs[7:10]] == ["a0.5_lr0.0005_s0", "detach_a0.5_lr0.0005_s0", "a0_lr5e-05_s1"]


def test_also_cells_add_seeds_at_one_setting():
    """``also`` adds cells with the variant's arguments (here two more seeds where the spread is widest)
    after the grid's own, without repeating a run the grid already has."""
    spec = dict(grid.load_spec("tiny"), variants={
        "": {"args": [], "also": [{"alphas": [0.0, 0.5], "learning_rates": [5e-4], "seeds": [2, 3, 4]}]},
        "detach": {"args": ["--detach_cos_embedding", "true"], "alphas": [0.5], "learning_rates": [5e-4],
                   "also": [{"seeds": [3]}]}})
    runs = grid.grid_runs(grid.check_spec(spec, "more seeds"))
    assert len(runs) == len(set(runs)) == 24 + 4 + 3 + 1  # seed 2 of the also cells is in the grid already
    assert [run.name for run in runs[-5:]] == ["a0_lr0.0005_s3", "a0.5_lr0.0005_s3", "detach_a0.5_lr0.0005_s3",
                                               "a0_lr0.0005_s4", "a0.5_lr0.0005_s4"]
    text = "".join(grid.variant_text(name, v) for name, v in grid.check_spec(spec, "more seeds")["variants"].items())
    assert "the grid also at alpha {0, 0.5}, learning rate {0.0005}, seeds {2, 3, 4}" in text
    assert "`--detach_cos_embedding true` at alpha {0.5}, learning rate {0.0005} (also at seeds {3})" in text
    for bad in ([{"seeds": []}], [{"steps": [1]}], {"seeds": [3]}):
        with pytest.raises(ValueError, match="'also': a list of objects"):
            grid.check_spec(dict(spec, variants={"": {"args": [], "also": bad}}), "bad")


def test_grid_order_is_seed_major():
    """A grid stopped part-way has covered every setting once before any setting gets its second seed."""
    runs = grid.grid_runs(grid.load_spec("tiny"))
    assert len(runs) == 24 and [run.seed for run in runs] == [0] * 8 + [1] * 8 + [2] * 8
    assert len({run.setting for run in runs[:8]}) == 8


def test_grid_two_runs_status_assemble_and_redo(tmp_path, capsys):
    runs = tmp_path / "runs"
    one_row = tmp_path / "tiny_row.json"  # one setting, three seeds: the first two runs are one table row
    spec = {key: value for key, value in grid.load_spec("tiny").items() if key != "name"}
    one_row.write_text(json.dumps(dict(spec, alphas=[0.0], learning_rates=[5e-5])))
    assert grid.main(["run", "--grid", str(one_row), "--dir", str(runs), "--next", "--", *FAST]) == 0
    # --all with a time budget that is spent at once: one run, then it stops
    assert grid.main(["run", "--grid", str(one_row), "--dir", str(runs), "--all", "--stop_after", "0",
                      "--", *FAST]) == 0
    first, second = runs / "a0_lr5e-05_s0" / "metrics.json", runs / "a0_lr5e-05_s1" / "metrics.json"
    assert first.exists() and second.exists() and not (runs / "a0_lr5e-05_s2").exists()
    m0, m1 = _read(first), _read(second)
    assert (m0["args"]["alpha"], m0["args"]["learning_rate"], m0["args"]["seed"]) == (0.0, 5e-5, 0)
    assert (m1["args"]["alpha"], m1["args"]["learning_rate"], m1["args"]["seed"]) == (0.0, 5e-5, 1)
    assert m0["train"]["global_step"] == 2 and m0["args"]["do_train"]

    capsys.readouterr()
    assert grid.main(["status", "--dir", str(runs)]) == 0
    assert "2 of 3 runs done" in capsys.readouterr().out

    page = tmp_path / "docs" / "experiments.md"
    assert grid.main(["assemble", "--dir", str(runs), "--out", str(page)]) == 0
    assembled = _read(tmp_path / "docs" / "results" / "experiments" / "tiny_row.json")
    (row,) = assembled["rows"]
    assert (row["alpha"], row["learning_rate"], row["seeds"]) == (0.0, 5e-5, [0, 1])
    for key in ("val_ppl", "test_ppl", "val_acc", "test_acc", "val_cos"):
        values = [_value(m0, key), _value(m1, key)]
        assert row["values"][key]["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert row["values"][key]["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
    for group in ("seen", "unseen"):
        changes = [m["geometry"]["after"][group]["relative_change"] for m in (m0, m1)]
        assert row["values"][f"{group}_change"]["mean"] == pytest.approx(statistics.fmean(changes), rel=1e-12)
        cos = [m["geometry"]["before"][group]["mean_pairwise_cosine"] for m in (m0, m1)]
        assert row["values"][f"{group}_cos_before"]["mean"] == pytest.approx(statistics.fmean(cos), rel=1e-12)
    text = page.read_text()
    ppl = [_value(m0, "val_ppl"), _value(m1, "val_ppl")]
    assert f"| {statistics.fmean(ppl):.3f} ± {statistics.stdev(ppl):.3f} |" in text
    assert "Runs done: 2 of 3" in text and "INCOMPLETE" in text
    assert grid.main(["assemble", "--check", "--out", str(page)]) == 0
    page.write_text(text.replace("Runs done: 2", "Runs done: 3"))
    assert grid.main(["assemble", "--check", "--out", str(page)]) == 1

    # an interrupted run (its folder without metrics.json) is redone, and only it
    first.unlink()
    (runs / "a0_lr5e-05_s0" / "leftover").write_text("from the interrupted attempt")
    untouched = second.read_text()
    assert grid.main(["run", "--dir", str(runs), "--next"]) == 0  # the grid and arguments recorded in --dir
    assert first.exists() and second.read_text() == untouched and not (runs / "a0_lr5e-05_s2").exists()
    assert not (runs / "a0_lr5e-05_s0" / "leftover").exists()
    assert _read(first)["eval"]["eval_perplexity"] == m0["eval"]["eval_perplexity"]  # same seed, same run


def _record(variant, alpha, lr, seed, **values):
    return {"variant": variant, "alpha": alpha, "learning_rate": lr, "seed": seed,
            "values": dict({key: 1.0 for key, *_ in grid.PAIRED}, **values)}


def test_paired_differences_against_the_same_seeds_baseline():
    """Each run is compared with the baseline of its own seed and learning rate; perplexity in % of it."""
    base_ppl, run_ppl = [10.0, 12.0, 11.0], [10.1, 12.12, 11.11]  # +1 % on every seed
    acc_delta = [0.01, -0.02, 0.005]  # spread around 0: inconclusive
    records = [_record("", 0.0, 1e-4, s, val_ppl=b, test_ppl=b, val_acc=0.5) for s, b in enumerate(base_ppl)]
    records += [_record("", 0.5, 1e-4, s, val_ppl=r, test_ppl=b, val_acc=0.5 + d)
                for s, (r, b, d) in enumerate(zip(run_ppl, base_ppl, acc_delta))]
    records += [_record("", 0.5, 1e-3, 0), _record("detach", 0.5, 1e-4, 0, val_ppl=9.0, test_ppl=11.0)]
    rows = {(r["variant"], r["alpha"], r["learning_rate"]): r for r in grid.paired_differences(records)}
    assert set(rows) == {("", 0.5, 1e-4), ("detach", 0.5, 1e-4)}  # no baseline at 1e-3: no pair

    mixed = rows[("", 0.5, 1e-4)]
    assert mixed["seeds"] == [0, 1, 2]
    ppl = mixed["deltas"]["val_ppl"]
    assert ppl["mean"] == pytest.approx(1.0) and ppl["significant"]
    acc = mixed["deltas"]["val_acc"]
    assert acc["mean"] == pytest.approx(statistics.fmean(acc_delta))
    assert acc["half_width"] == pytest.approx(4.303 * statistics.stdev(acc_delta) / math.sqrt(3))
    assert not acc["significant"]
    assert mixed["deltas"]["test_ppl"]["mean"] == pytest.approx(0.0) and mixed["reading"] == "worse"
    assert mixed["higher_perplexity"] == {"val_ppl": 3, "test_ppl": 0}

    detach = rows[("detach", 0.5, 1e-4)]
    assert detach["deltas"]["val_ppl"]["mean"] == pytest.approx(-10.0) and detach["reading"] == "one seed"
    assert not detach["deltas"]["val_ppl"]["significant"]


@pytest.mark.parametrize("deltas,reading", [([[-1.0, -1.1, -0.9], [-2.0, -2.1, -1.9]], "better"),
                                            ([[1.0, 1.1, 0.9], [-2.0, -2.1, -1.9]], "mixed"),
                                            ([[1.0, -1.1, 0.2], [0.1, -0.1, 0.0]], "inconclusive")])
def test_perplexity_reading(deltas, reading):
    paired = {key: grid.paired_spread(d) for key, d in zip(("val_ppl", "test_ppl"), deltas)}
    assert grid.perplexity_reading(paired) == reading


def test_t_quantiles_are_students():
    """T_975[k - 1] is where Student's t with k degrees of freedom has cumulative probability 0.975
    (its density integrated numerically from 0)."""
    for dof, quantile in enumerate(grid.T_975, start=1):
        log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
        steps = 20000
        xs = [quantile * i / steps for i in range(steps + 1)]
        ys = [math.exp(log_norm - (dof + 1) / 2 * math.log1p(x * x / dof)) for x in xs]
        area = quantile / steps * (sum(ys) - (ys[0] + ys[-1]) / 2)  # trapezoid over [0, quantile]
        assert 0.5 + area == pytest.approx(0.975, abs=2e-4), dof


def test_grid_may_grow_but_not_change_a_finished_run(tmp_path, capsys):
    spec = grid.load_spec("tiny")
    grid.fix_grid(str(tmp_path), spec, ["--max_steps", "2"])
    finished = tmp_path / grid.grid_runs(spec)[0].name / "metrics.json"
    finished.parent.mkdir()
    finished.write_text(json.dumps({"run": {"trained": True}, "eval": {}}))
    grid.fix_grid(str(tmp_path), spec, ["--max_steps", "2"])  # the same: fine
    with pytest.raises(ValueError, match="finished run a0_lr5e-05_s0 is not in this grid with the same"):
        grid.fix_grid(str(tmp_path), spec, ["--max_steps", "3"])
    grown = dict(spec, variants={**spec["variants"], "detach": {"args": ["--detach_cos_embedding", "true"],
                                                               "alphas": [0.5], "learning_rates": [5e-4]}})
    grid.fix_grid(str(tmp_path), grown, ["--max_steps", "2"])  # new runs only: fine, and recorded
    assert grid.recorded_grid(str(tmp_path))["grid"] == grown
    assert grid.main(["status", "--dir", str(tmp_path)]) == 0
    assert "1 of 27 runs done" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is not in this grid"):
        grid.fix_grid(str(tmp_path), dict(spec, seeds=[1, 2]), ["--max_steps", "2"])
    assert grid.main(["run", "--grid", "tiny", "--dir", str(tmp_path), "--next", "--", "--alpha", "0.3"]) == 2
    assert "the grid sets" in capsys.readouterr().err


def test_grid_spec_file(tmp_path):
    path = tmp_path / "remedies.json"
    path.write_text(json.dumps({"args": ["--model_name_or_path", "tiny"], "alphas": [0, 0.5], "learning_rates": [5e-4],
                                "seeds": [0, 1, 2], "variants": {"": [], "detach": {
                                    "args": ["--detach_cos_embedding", "true"], "alphas": [0.5]},
                                    "warmup": {"args": ["--alpha_warmup", "0.3"], "alphas": [0.5], "seeds": [0]}}}))
    spec = grid.load_spec(str(path))
    names = [run.name for run in grid.grid_runs(spec)]
    assert spec["name"] == "remedies" and len(names) == 6 + 3 + 1
    assert names == ["a0_lr0.0005_s0", "a0.5_lr0.0005_s0", "detach_a0.5_lr0.0005_s0", "warmup_a0.5_lr0.0005_s0",
                     "a0_lr0.0005_s1", "a0.5_lr0.0005_s1", "detach_a0.5_lr0.0005_s1",
                     "a0_lr0.0005_s2", "a0.5_lr0.0005_s2", "detach_a0.5_lr0.0005_s2"]
    run = grid.grid_runs(spec)[2]
    argv = grid.run_argv(spec, run, "out", [])
    assert argv[argv.index("--alpha") + 1] == "0.5" and argv[argv.index("--seed") + 1] == "0"
    assert argv[argv.index("--detach_cos_embedding") + 1] == "true"
    path.write_text(json.dumps({"alphas": [0.5], "learning_rates": [5e-4]}))
    with pytest.raises(ValueError, match="missing keys \\['seeds'\\]"):
        grid.load_spec(str(path))
    path.write_text(json.dumps({"alphas": [0.5], "learning_rates": [5e-4], "seeds": [0],
                                "variants": {"x": {"alpha": [1]}}}))
    with pytest.raises(ValueError, match="variant 'x'"):
        grid.load_spec(str(path))


def test_spread_of_one_seed_has_no_std():
    stats = grid.spread([2.0, math.nan])
    assert stats["n"] == 1 and stats["mean"] == 2.0 and math.isnan(stats["std"])


def test_a_claimed_run_is_left_to_its_process_and_a_stale_lock_taken_over(tmp_path, capsys):
    """Two grid processes in one directory train different runs: a run whose lock a live process holds
    is skipped (and shown as running); a lock whose process is gone is taken over."""
    import subprocess
    import sys

    spec = grid.load_spec("tiny")
    first, second = grid.grid_runs(spec)[:2]
    grid.fix_grid(str(tmp_path), spec, list(FAST))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(grid.lock_path(str(tmp_path), first), "w") as handle:
            handle.write(str(holder.pid))
        assert grid.claimed_by_other(str(tmp_path), first)
        assert grid.claim_next(str(tmp_path), [first, second]) == second
        assert grid.claim(str(tmp_path), second)                       # already this process's
        grid.release(str(tmp_path), second)
        assert not os.path.exists(grid.lock_path(str(tmp_path), second))
        capsys.readouterr()
        assert grid.main(["status", "--dir", str(tmp_path)]) == 0
        assert f"running {first.name}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert not grid.claimed_by_other(str(tmp_path), first)
    assert grid.claim_next(str(tmp_path), [first, second]) == first    # the stale lock is taken over
    assert int(open(grid.lock_path(str(tmp_path), first)).read()) == os.getpid()


def test_a_run_finished_by_another_process_is_not_claimed(tmp_path):
    spec = grid.load_spec("tiny")
    first, second = grid.grid_runs(spec)[:2]
    metrics = tmp_path / first.name / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"run": {"trained": True}, "eval": {}}))
    assert grid.claim_next(str(tmp_path), [first, second]) == second
    assert not os.path.exists(grid.lock_path(str(tmp_path), first))


# ---- the committed experiment -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_PAGE = ROOT / "docs" / "experiments.md"
SMOLLM2_GRID = ROOT / "docs" / "results" / "smollm2_grid"


def test_the_committed_experiment_is_what_its_runs_give():
    """docs/experiments.md and its JSON are what ``assemble`` gives from the committed runs' metrics.json."""
    spec, extra = grid.spec_of(str(SMOLLM2_GRID), None)
    results = grid.collect(str(SMOLLM2_GRID), spec, extra)
    json_path, png = grid.result_paths(str(EXPERIMENT_PAGE), spec["name"])
    assert Path(json_path).read_text() == json.dumps(results, indent=2) + "\n", \
        "run python -m fused_cosloss.grid assemble --dir docs/results/smollm2_grid --out docs/experiments.md"
    assert os.path.exists(png) and grid.check_page(str(EXPERIMENT_PAGE), json_path)


def test_the_readme_answer_quotes_the_experiment():
    """Every difference the README's answer quotes (a signed percentage) is on the generated page."""
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- the answer: numbers from docs/experiments.md -->", "<!-- end of the answer -->"
    assert start in readme and end in readme
    answer = readme.split(start, 1)[1].split(end, 1)[0]
    quoted = re.findall(r"[+-]\d+\.\d+ %", answer)
    assert quoted, "the answer quotes no number"
    page = EXPERIMENT_PAGE.read_text()
    assert [q for q in quoted if q not in page] == []
