"""The training script's reports, without training: the process layout, the load average, the
comparison plot, and the tables of docs/training.md regenerated from the committed results."""
from __future__ import annotations

import copy
import json
import math
import os
import types

import pytest

from fused_cosloss import train_env, train_report

RESULTS = train_report.RESULTS


def _training_args(world=1, rank=0, local=0, device="cpu", backend=None):
    return types.SimpleNamespace(world_size=world, process_index=rank, local_process_index=local, device=device,
                                 ddp_backend=backend)


# ---- the process layout -------------------------------------------------------------------------

def test_accelerate_cpu_one_process_is_said():
    """accelerate launch --cpu --num_processes 2 runs one process: the script says so at start."""
    env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    world = train_env.world_layout(_training_args(), threads=2, env=env)
    assert world["world_size"] == 1 and world["launcher"] == "accelerate launch" and world["accelerate_cpu"]
    text = train_env.layout_text(world)
    assert text.startswith("world: 1 process on cpu, 2 torch thread(s) each, started by accelerate launch")
    assert "--multi_gpu --num_processes N" in text


def test_torchrun_layout():
    env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
    world = train_env.world_layout(_training_args(world=4, rank=3, local=1, backend="gloo"), threads=1, env=env)
    assert (world["world_size"], world["rank"], world["local_rank"], world["processes_per_node"], world["nodes"]) == \
        (4, 3, 1, 2, 2)
    text = train_env.layout_text(world)
    assert "4 processes (2 per node on 2 node(s), gloo)" in text and "torchrun" in text and "note" not in text


def test_plain_python_layout():
    world = train_env.world_layout(_training_args(), threads=1, env={})
    assert world["launcher"] == "python" and "note" not in train_env.layout_text(world)


# ---- the load average ---------------------------------------------------------------------------

class _Machine:
    """A clock and a load average that the test sets."""

    def __init__(self):
        self.now, self.load = 0.0, 0.0

    def clock(self):
        return self.now

    def read(self):
        return self.load


def test_own_load_is_the_exponential_average_of_the_threads():
    assert train_env.own_load(2, ran_s=60) == pytest.approx(2 * (1 - math.exp(-1)))
    assert train_env.own_load(2, ran_s=1e9, since_end_s=60) == pytest.approx(2 * math.exp(-1))


def test_load_probe_marks_a_busy_machine():
    machine = _Machine()
    probe = train_env.LoadProbe(threads=1, cores=2, clock=machine.clock, read=machine.read)
    machine.load = 3.0  # other work before the run
    probe.start()
    machine.now, machine.load = 10.0, 3.2
    record = probe.stop()
    assert record["busy"] and record["load_before"] == 3.0 and record["other_load_before"] == 3.0
    assert "WARNING: the machine was busy" in train_env.load_text(record)


def test_load_probe_does_not_count_the_scripts_own_previous_run():
    """An idle machine: a long first run leaves its own thread in the load average; the next run is not busy."""
    machine = _Machine()
    probe = train_env.LoadProbe(threads=2, cores=2, clock=machine.clock, read=machine.read)
    probe.start()
    machine.now = 600.0
    machine.load = train_env.own_load(2, 600.0)  # only the run itself
    first = probe.stop()
    assert first["busy"] is False and first["other_load_after"] == pytest.approx(0.0, abs=1e-9)
    machine.now += 5.0
    machine.load = train_env.own_load(2, 600.0, 5.0)  # 1.8: more than half the cores, all of it ours
    probe.start()
    machine.now += 5.0
    machine.load = train_env.own_load(2, 600.0, 10.0) + train_env.own_load(2, 5.0)
    second = probe.stop()
    assert second["busy"] is False and second["load_before"] > 1.0
    assert second["other_load_before"] == pytest.approx(0.0, abs=1e-9)


def test_load_probe_without_a_load_average():
    probe = train_env.LoadProbe(threads=1, cores=2, read=lambda: None)
    probe.start()
    assert probe.stop()["busy"] is None


def test_busy_runs_mark_their_times_and_the_pair_summary():
    comparison = train_report.read_comparison(RESULTS, "pair.json")
    runs = copy.deepcopy(comparison["runs"])
    base, mixed = [m for m in runs if train_report.is_trained(m)]
    for m in runs:
        m["run"]["load"] = dict(m["run"]["load"], busy=False, other_load_before=0.1, other_load_after=0.1)
    assert " *" not in train_report.comparison_table(runs) and "UNRELIABLE" not in train_report.pair_summary(base, mixed)
    mixed["run"]["load"].update(busy=True, other_load_before=3.9)
    table = train_report.comparison_table(runs)
    assert table.count(" *") == 2  # the busy run's train and eval times
    assert "UNRELIABLE" in train_report.pair_summary(base, mixed)
    assert "Times marked * are unreliable" in train_report.comparison_text(runs)


# ---- the plot -----------------------------------------------------------------------------------

def test_plot_has_a_log_perplexity_axis_distinct_markers_and_labelled_values():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    runs = train_report.read_comparison(RESULTS, "grid.json")["runs"]
    fig = train_report.comparison_figure(runs)
    try:
        perplexity = fig.axes[0]
        assert perplexity.get_yscale() == "log"
        temperatures = sorted({m["args"]["temperature"] for m in runs})
        lines = [line for line in perplexity.get_lines() if line.get_label().startswith("T=")]
        assert len(lines) == len(temperatures)
        assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == len(lines)
        trained = [m for m in runs if train_report.is_trained(m)]
        labels = {text.get_text() for text in perplexity.texts}
        assert len(perplexity.texts) == len(trained)
        assert f"{trained[-1]['eval']['eval_perplexity']:.3g}" in labels
        assert any(line.get_label().startswith("untrained") for line in perplexity.get_lines())
    finally:
        plt.close(fig)


# ---- docs/training.md ---------------------------------------------------------------------------

def test_docs_tables_are_what_the_committed_results_give():
    """The generated parts of docs/training.md equal what python -m fused_cosloss.train_report writes."""
    with open(train_report.DOC, encoding="utf-8") as handle:
        text = handle.read()
    blocks = train_report.BLOCK.findall(text)
    assert len(blocks) >= 3
    assert train_report.render_docs(text, RESULTS) == text, "run: python -m fused_cosloss.train_report"
    assert train_report.main(["--check"]) == 0


def test_docs_generator_rewrites_a_stale_table(tmp_path):
    stale = tmp_path / "doc.md"
    stale.write_text("before\n<!-- generated: table pair.json -->\n| alpha | 1.3262 |\n<!-- end generated -->\nafter\n")
    assert train_report.main([str(stale), "--check"]) == 1
    assert train_report.main([str(stale)]) == 0
    text = stale.read_text()
    assert "1.3262" not in text and text.startswith("before\n") and text.endswith("<!-- end generated -->\nafter\n")
    assert "| run | alpha | T |" in text and train_report.main([str(stale), "--check"]) == 0


def test_committed_results_are_comparisons_of_the_script():
    names = sorted(name for name in os.listdir(RESULTS) if name.endswith(".json"))
    assert {"pair.json", "grid.json"} <= set(names)
    for name in names:
        with open(os.path.join(RESULTS, name)) as handle:
            comparison = json.load(handle)
        assert comparison["kind"] in ("pair", "grid", "single", "eval") and comparison["runs"]
        assert not train_report.is_trained(comparison["runs"][0]), f"{name}: the first row is the model before training"


# ---- the parallel layout ------------------------------------------------------------------------

def _trainer(world=1, fsdp=(), fsdp_enabled=False, fsdp_version=2, tp_size=None, device="cpu"):
    args = types.SimpleNamespace(world_size=world, fsdp=list(fsdp), device=device)
    plugin = types.SimpleNamespace(fsdp_version=fsdp_version) if fsdp_enabled else None
    return types.SimpleNamespace(args=args, model=types.SimpleNamespace(tp_size=tp_size),
                                 is_fsdp_enabled=fsdp_enabled,
                                 accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)))


def test_parallel_layout_names_what_the_trainer_does():
    assert train_env.parallel_layout(_trainer()) == "single process"
    assert train_env.parallel_layout(_trainer(world=2)) == "data parallel (DDP)"
    assert train_env.parallel_layout(_trainer(world=2, fsdp=["full_shard"], fsdp_enabled=True)) == "FSDP2"
    assert train_env.parallel_layout(_trainer(world=2, fsdp=["full_shard"], fsdp_enabled=True, fsdp_version=1)) == \
        "FSDP1"
    assert train_env.parallel_layout(_trainer(world=4, tp_size=4)) == "tensor parallel (4-way)"
    world = dict(train_env.world_layout(_training_args(world=2, backend="gloo"), threads=1, env={}),
                 parallel="FSDP2")
    assert train_env.layout_text(world).endswith("; layout: FSDP2")


def test_fsdp_that_accelerate_did_not_enable_is_refused():
    """On CPU accelerate runs --fsdp as plain data parallel without a word: the script refuses instead."""
    with pytest.raises(ValueError, match=r"--fsdp: accelerate did not enable FSDP.*on cpu"):
        train_env.parallel_layout(_trainer(world=2, fsdp=["full_shard"], fsdp_enabled=False))
