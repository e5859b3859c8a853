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


@pytest.fixture(scope="module")
def experiment(hf):
    from fused_cosloss import experiment

    return experiment


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


def test_every_comparison_starts_with_the_model_before_training(clipped_run):
    from fused_cosloss import train_report

    out, results, _ = clipped_run
    before, after = results
    assert not before["run"]["trained"] and before["args"]["alpha"] is None
    assert train_report.row_label(before) == "untrained"  # the tiny model starts from scratch
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


def test_save_model_casts_a_copy(experiment, tmp_path):
    """The saved bf16 weights are the trained float32 weights rounded; the model in memory stays float32."""
    import types

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from fused_cosloss import text_data

    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    tokenizer = text_data.train_tokenizer(["a b c d"] * 3, 260)
    run = types.SimpleNamespace(trainer=types.SimpleNamespace(args=types.SimpleNamespace(should_save=True), model=model),
                                tokenizer=tokenizer)
    assert experiment.save_model(run, str(tmp_path), "bfloat16") == {"dir": str(tmp_path), "dtype": "bfloat16"}
    assert next(model.parameters()).dtype == torch.float32
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, mine.to(torch.bfloat16)), name
    assert experiment.save_model(run, str(tmp_path / "auto"), "auto")["dtype"] == "float32"


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


def test_bad_optimiser_flags_are_refused(train, tmp_path, capsys):
    import re

    with pytest.raises(SystemExit):  # the command line: argparse names the flag and its choices
        train.main([*QUICK, "--lr_scheduler_type", "sawtooth", "--output_dir", str(tmp_path)])
    assert re.search("lr_scheduler_type.*sawtooth.*linear", capsys.readouterr().err)
    config = tmp_path / "args.json"  # a JSON file: the script's own check
    config.write_text(json.dumps({"lr_scheduler_type": "sawtooth", "output_dir": str(tmp_path)}))
    with pytest.raises(SystemExit, match="lr_scheduler_type.*linear"):
        train.main([str(config)])
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
        assert world["parallel"] == "single process"
    else:
        assert (world["launcher"], world["processes_per_node"], world["distributed_backend"]) == ("torchrun", 2, "gloo")
        assert "world: 2 processes (2 per node on 1 node(s), gloo) on cpu" in process.stdout
        assert world["parallel"] == "data parallel (DDP)" and "; layout: data parallel (DDP)" in process.stdout


@pytest.mark.slow
def test_fsdp_that_would_silently_be_data_parallel_is_refused(train, tmp_path):
    """accelerate does not shard on CPU and would train --fsdp as plain DDP: the script stops with the reason."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    command = [sys.executable, *LAUNCHES["torchrun"][0], "fused_cosloss.train", *QUICK, "--max_steps", "1",
               "--eval_pretrained", "false", "--output_dir", str(tmp_path / "run"), "--fsdp", "full_shard",
               "--fsdp_config", '{"version": 2}']
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert process.returncode != 0
    assert "error: --fsdp: accelerate did not enable FSDP for this run (on cpu" in process.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- the arguments: HfArgumentParser over TrainingArguments, as run_clm.py --------------------------

def test_help_lists_the_groups_and_every_trainer_flag(train, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for group in ("\nmodel:", "\ndata:", "\nmixed loss and the comparison:", "\ntraining (transformers TrainingArguments"):
        assert group in text, group
    for flag in ("--model_name_or_path", "--model_name ", "--max_train_samples", "--report_to", "--gradient_checkpointing",
                 "--torch_compile", "--save_strategy", "--cos_topk", "--compare_alphas"):
        assert flag in text, flag


def test_trainer_flags_reach_the_training_arguments(train):
    """Flags the script does not declare are TrainingArguments' own, parsed as transformers does."""
    args = train.parse_args(["--model_name", "some/model", "--report_to", "none", "--lr_scheduler_type", "cosine",
                             "--optim", "sgd", "--save_strategy", "steps", "--save_steps", "7",
                             "--lr_scheduler_kwargs", '{"num_cycles": 0.25}', "--max_steps", "9"])
    training = args.training
    assert args.model.model_name_or_path == "some/model"  # --model_name: an alias of --model_name_or_path
    assert training.report_to in ([], "none", ["none"])
    assert training.lr_scheduler_type == "cosine" and training.optim == "sgd"
    assert (training.save_strategy, training.save_steps, training.max_steps) == ("steps", 7, 9)
    assert training.lr_scheduler_kwargs == {"num_cycles": 0.25}
    assert isinstance(training, __import__("transformers").TrainingArguments)


def test_given_values_are_never_replaced_by_the_model_presets(train):
    """The tiny model given the pretrained preset's values, and a pretrained one the tiny preset's: each
    keeps what it was given (0 and false included), and the rest is its own preset."""
    for model, given_preset, own_preset in (("tiny", "pretrained", "tiny"), ("some/model", "tiny", "pretrained")):
        given = train.PRESETS[given_preset]
        argv = ["--model_name_or_path", model]
        for key, value in given.items():
            argv += [f"--{key}", str(value)]
        args = train.parse_args(argv + ["--disable_tqdm", "false", "--use_cpu", "false", "--num_threads", "2"])
        values = {**vars(args.training), **vars(args.data)}
        assert {key: values[key] for key in given} == given, model
        assert values["disable_tqdm"] is False and values["use_cpu"] is False and values["num_threads"] == 2
        alone = train.parse_args(["--model_name_or_path", model])
        own = {key: {**vars(alone.training), **vars(alone.data)}[key] for key in given}
        assert own == train.PRESETS[own_preset], model
    zero = train.parse_args(["--warmup_ratio", "0"]).training  # falsy, and still the user's
    assert zero.warmup_ratio == 0 and zero.get_warmup_steps(100) == 0
    assert train.parse_args([]).training.get_warmup_steps(100) == 5  # the tiny preset's 5%


def test_json_file_as_the_only_argument(train, tmp_path):
    """``python -m fused_cosloss.train args.json``: the same arguments as the command line."""
    config = tmp_path / "args.json"
    values = {"model_name_or_path": "some/model", "max_train_samples": 10, "alpha": 0.25, "cos_topk": "none",
              "lr_scheduler_type": "cosine", "learning_rate": 1e-3, "compare_alphas": [0, 0.5], "report_to": "none",
              "output_dir": str(tmp_path / "run")}
    config.write_text(json.dumps(values))
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    from_json, from_argv = train.parse_args([str(config)]), train.parse_args(argv)
    assert from_json.record() == from_argv.record()
    record = from_json.record()
    assert (record["max_train_samples"], record["cos_topk"], record["lr_scheduler_type"]) == (10, None, "cosine")
    assert record["per_device_train_batch_size"] == 2  # the pretrained preset fills what the file leaves out
    config.write_text(json.dumps({"model_name": "other/model"}))  # the command line's alias works here too
    assert train.parse_args([str(config)]).model.model_name_or_path == "other/model"
    config.write_text(json.dumps({"subset_train": 10}))
    with pytest.raises(SystemExit, match="subset_train"):
        train.parse_args([str(config)])


def test_max_samples_keep_the_first_rows(train):
    from fused_cosloss import text_data

    args = train.parse_args(["--generated_sentences", "300", "--max_train_samples", "10", "--max_eval_samples", "7",
                             "--max_test_samples", "5"])
    splits = text_data.load_raw_splits(args.data, args.training.seed)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 10, "validation": 7, "test": 5}
    whole = text_data.load_raw_splits(train.parse_args(["--generated_sentences", "300"]).data, 0)
    assert splits["train"]["text"] == whole["train"]["text"][:10]


def test_config_name_gives_the_architecture(train, experiment, tmp_path):
    """--config_name: the config a --from_scratch model is built from, or a pretrained one loads with."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fused_cosloss import text_data

    tokenizer = text_data.train_tokenizer(["a b c d"] * 3, 260)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=3, n_head=2).save_pretrained(
        tmp_path / "config")
    for extra in (["--from_scratch"], []):
        args = train.parse_args(["--model_name_or_path", str(tmp_path / "model"), "--config_name",
                                 str(tmp_path / "config"), "--block_size", "16", *extra])
        model, _ = experiment.build_model_and_tokenizer(args, None)
        assert model.config.n_layer == 3 and len(model.transformer.h) == 3, extra
    args = train.parse_args(["--model_name_or_path", str(tmp_path / "model"), "--block_size", "16"])
    assert experiment.build_model_and_tokenizer(args, None)[0].config.n_layer == 1
    with pytest.raises(SystemExit, match="--config_name: the 'tiny' model builds its own config"):
        train.parse_args(["--config_name", str(tmp_path / "config")])


def test_trainer_only_flags_change_the_run(train, tmp_path):
    """Flags of TrainingArguments the script never names act on the Trainer: a cosine schedule, checkpoints
    every 2 steps; --max_train_samples keeps the first rows."""
    out = tmp_path / "run"
    (result,) = train.main([*QUICK, "--alpha", "0.5", "--max_steps", "4", "--logging_steps", "1", "--learning_rate",
                            "1e-2", "--lr_scheduler_type", "cosine", "--warmup_steps", "0", "--report_to", "none",
                            "--save_strategy", "steps",
                            "--save_steps", "2", "--max_train_samples", "100", "--eval_pretrained", "false",
                            "--output_dir", str(out)])
    logged = [entry["learning_rate"] for entry in result["train"]["log_history"]]
    assert logged == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert result["train"]["schedule"]["lr_scheduler_type"] == "cosine"
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-2", "checkpoint-4"}
    assert result["args"]["max_train_samples"] == 100 and result["args"]["save_strategy"] == "steps"


def test_the_recorded_backend_is_the_one_auto_picks(experiment):
    from fused_cosloss import backends

    embedding = torch.ones(3, 2)
    expected = "native" if backends.why_unavailable("native", embedding, embedding) is None else "reference"
    assert experiment.resolved_backend("auto", embedding) == expected
    assert experiment.resolved_backend("reference", embedding) == "reference"


def test_resume_from_checkpoint_continues_a_single_run(train, tmp_path):
    """--resume_from_checkpoint (a TrainingArguments field the script passes to Trainer.train, as run_clm.py):
    two steps, then resumed from the step-2 checkpoint to four (with another seed, which without the checkpoint
    would give another model and other losses); refused for the pair and the grid."""
    flags = [*QUICK, "--alpha", "0.5", "--logging_steps", "1", "--warmup_steps", "0", "--eval_pretrained", "false",
             "--save_strategy", "steps", "--save_steps", "2"]
    (first,) = train.main([*flags, "--max_steps", "4", "--output_dir", str(tmp_path / "first")])
    (resumed,) = train.main([*flags, "--max_steps", "4", "--seed", "7", "--resume_from_checkpoint",
                             str(tmp_path / "first" / "checkpoint-2"), "--output_dir", str(tmp_path / "resumed")])
    assert resumed["train"]["global_step"] == 4
    steps = [entry["step"] for entry in resumed["train"]["log_history"]]
    assert steps == [1, 2, 3, 4]
    assert resumed["train"]["log_history"][:2] == first["train"]["log_history"][:2]  # the checkpoint's own logs
    with pytest.raises(SystemExit, match="resume_from_checkpoint: only for one training run"):
        train.parse_args(["--resume_from_checkpoint", str(tmp_path / "first" / "checkpoint-2")])
