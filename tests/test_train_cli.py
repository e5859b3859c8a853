"""The training script as a researcher runs it: evaluation before training, the optimiser flags
(clipping, schedule, warm-up), saving in another dtype, readable logs, the process layout and the
load average in metrics.json. Tiny model, a few steps each."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def train(hf):
    from fused_cosloss import train

    return train


QUICK = ["--generated_sentences", "300", "--block_size", "32", "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "64", "--backend", "reference"]


@pytest.fixture(scope="module")
def clipped_run(train, tmp_path_factory):
    """One run with a clipping norm so small that Adam cannot move the weights, a constant schedule with
    two warm-up steps, saved in bfloat16; its printed output (neither stream a terminal, progress bars
    left at their default) is kept."""
    out = tmp_path_factory.mktemp("clipped")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        results = train.main([*QUICK, "--alpha", "0.5", "--max_steps", "4", "--logging_steps", "1", "--max_grad_norm",
                              "1e-12", "--warmup_steps", "2", "--lr_scheduler_type", "constant_with_warmup",
                              "--learning_rate", "1e-2", "--save_model", "--save_dtype", "bfloat16",
                              "--output_dir", str(out)])
    return out, results, printed.getvalue()


def test_every_comparison_starts_with_the_model_before_training(train, clipped_run):
    out, results, _ = clipped_run
    before, after = results
    assert not before["run"]["trained"] and before["args"]["alpha"] is None
    assert train.train_report.row_label(before) == "untrained"  # the tiny model starts from scratch
    # a random init predicts about uniformly: its CE is near log V
    vocab = int(before["run"]["model"].split("V=")[1].split(",")[0])
    assert abs(before["eval"]["eval_ce_loss"] - math.log(vocab)) < 0.1
    rows = (out / "comparison.md").read_text().splitlines()
    assert rows[1].startswith("| run |") and rows[3].startswith("| untrained | - | 1 |")
    assert rows[4].startswith("| trained | 0.5 | 1 |")
    assert json.loads((out / "pretrained" / "metrics.json").read_text())["eval"] == before["eval"]


def test_max_grad_norm_reaches_the_optimiser(clipped_run):
    """Clipped to 1e-12, Adam moves each weight by at most lr * 1e-12 / eps = 1e-6 a step (against lr = 1e-2
    unclipped): the trained model evaluates as the initial one, to ~1e-5 nats."""
    _, (before, after), _ = clipped_run
    assert after["train"]["schedule"]["max_grad_norm"] == 1e-12
    assert after["eval"]["eval_ce_loss"] == pytest.approx(before["eval"]["eval_ce_loss"], abs=1e-4)
    assert after["train"]["log_history"][0]["grad_norm"] > 1e-3  # the norm before clipping is logged


def test_schedule_and_warmup_are_the_trainers_and_recorded(clipped_run):
    out, (_, after), _ = clipped_run
    schedule = after["train"]["schedule"]
    assert schedule == {"max_grad_norm": 1e-12, "lr_scheduler_type": "constant_with_warmup", "lr_scheduler_kwargs": {},
                        "learning_rate": 1e-2, "warmup_steps": 2, "max_steps": 4}
    args = json.loads((out / "metrics.json").read_text())["args"]
    assert (args["warmup_steps"], args["lr_scheduler_type"], args["max_grad_norm"]) == (2, "constant_with_warmup", 1e-12)
    # constant with 2 warm-up steps: lr * min(1, s / 2) for steps s = 0, 1, 2, 3 (logged after each)
    logged = [entry["learning_rate"] for entry in after["train"]["log_history"]]
    assert logged == pytest.approx([1e-2 * min(1.0, s / 2) for s in range(4)])


def test_save_model_in_bfloat16(train, clipped_run):
    from transformers import AutoModelForCausalLM

    out, (_, after), _ = clipped_run
    assert after["run"]["saved"] == {"dir": str(out), "dtype": "bfloat16"}
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    assert saved.dtype == torch.bfloat16
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight


def test_save_model_casts_a_copy(train, tmp_path):
    """The saved bf16 weights are the trained float32 weights rounded; the model in memory stays float32."""
    import types

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    tokenizer = train.train_tokenizer(["a b c d"] * 3, 260)
    run = types.SimpleNamespace(trainer=types.SimpleNamespace(args=types.SimpleNamespace(should_save=True), model=model),
                                tokenizer=tokenizer)
    assert train.save_model(run, str(tmp_path), "bfloat16") == {"dir": str(tmp_path), "dtype": "bfloat16"}
    assert next(model.parameters()).dtype == torch.float32
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, mine.to(torch.bfloat16)), name
    assert train.save_model(run, str(tmp_path / "auto"), "auto")["dtype"] == "float32"


def test_world_layout_and_load_in_metrics(clipped_run):
    out, (before, after), _ = clipped_run
    world = after["run"]["world"]
    assert (world["world_size"], world["rank"], world["processes_per_node"], world["nodes"]) == (1, 0, 1, 1)
    assert world["launcher"] in ("python", "torchrun", "accelerate launch") and world["threads_per_process"] == 1
    for m in (before, after):
        load = m["run"]["load"]
        assert load["cores"] >= 1 and load["run_s"] >= 0
        assert load["busy"] in (True, False, None)


def test_logs_have_no_carriage_returns_when_not_a_terminal(clipped_run):
    """No --disable_tqdm and stderr not a terminal: no progress bars, and the training logs print as lines."""
    _, _, printed = clipped_run
    assert "\r" not in printed
    assert printed.count("'loss'") == 4  # the Trainer prints each log instead
    assert "world: 1 process on cpu, 1 torch thread(s) each" in printed


def test_eval_only_mode(train, clipped_run, tmp_path):
    """--do_train false: the model as loaded, evaluated (the same numbers as the first row of a training run)."""
    _, (before, _), _ = clipped_run
    results = train.main([*QUICK, "--do_train", "false", "--output_dir", str(tmp_path)])
    assert len(results) == 1 and not results[0]["run"]["trained"]
    assert results[0]["eval"]["eval_ce_loss"] == before["eval"]["eval_ce_loss"]
    assert results[0]["test"]["test_token_acc"] == before["test"]["test_token_acc"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train"] == {} and "comparison.md" in {p.name for p in tmp_path.iterdir()}


def test_evaluating_first_does_not_change_training(train, tmp_path):
    runs = []
    for flag in ("true", "false"):
        runs.append(train.main([*QUICK, "--alpha", "0.5", "--max_steps", "3", "--eval_pretrained", flag,
                                "--output_dir", str(tmp_path / flag)]))
    with_first, without = runs
    assert len(with_first) == 2 and len(without) == 1
    assert with_first[1]["eval"]["eval_ce_loss"] == without[0]["eval"]["eval_ce_loss"]
    assert with_first[1]["train"]["train_loss"] == without[0]["train"]["train_loss"]


def test_bad_optimiser_flags_are_refused(train, tmp_path):
    with pytest.raises(SystemExit, match="lr_scheduler_type.*linear"):
        train.main([*QUICK, "--lr_scheduler_type", "sawtooth", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="give one of them"):
        train.main([*QUICK, "--warmup_steps", "3", "--warmup_ratio", "0.1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="max_grad_norm"):
        train.main([*QUICK, "--max_grad_norm", "-1", "--output_dir", str(tmp_path)])


LAUNCHES = {
    # accelerate's --cpu takes its simple launcher: one process, whatever --num_processes says
    "accelerate --cpu": (["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m"], 1),
    "torchrun": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHES))
def test_launched_script_says_and_records_its_layout(train, tmp_path, launcher):
    """What the launcher really started is printed at start and recorded in metrics.json."""
    import os
    import subprocess
    import sys

    prefix, world_size = LAUNCHES[launcher]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    command = [sys.executable, *prefix, "fused_cosloss.train", *QUICK, "--alpha", "0.5", "--max_steps", "1",
               "--eval_pretrained", "false", "--output_dir", str(tmp_path / "run")]
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    world = json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]["world"]
    assert world["world_size"] == world_size
    if world_size == 1:
        assert world["launcher"] == "accelerate launch" and world["accelerate_cpu"]
        assert "world: 1 process on cpu" in process.stdout and "accelerate launch --cpu` starts one process" in process.stdout
    else:
        assert (world["launcher"], world["processes_per_node"], world["distributed_backend"]) == ("torchrun", 2, "gloo")
        assert "world: 2 processes (2 per node on 1 node(s), gloo) on cpu" in process.stdout
