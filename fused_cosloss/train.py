"""``python -m fused_cosloss.train``: the seed experiment (CE baseline against the mixed loss) with transformers.

With no arguments it runs offline in a few minutes on a CPU: a tiny GPT-2 (tied
embeddings) trained from scratch, with a byte-level BPE tokenizer trained on the spot,
on the generated corpus of :mod:`fused_cosloss.corpus`; the baseline (alpha = 0) and the
mixed loss (alpha = 0.5) both run and the comparison prints.

The seed's run (needs the network)::

    python -m fused_cosloss.train --model_name distilgpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --text_field text

A GGUF checkpoint (``--gguf_file``) is loaded as an ordinary float model
(:mod:`fused_cosloss.gguf_model`), so it trains and saves like any other.

Modes: ``--alpha A`` makes one run; no ``--alpha`` runs baseline and mixed (alpha 0 and
0.5); ``--compare`` runs the grid ``--compare_alphas`` x ``--compare_temperatures``
(default {0, 0.25, 0.5, 0.75} x {0.7, 1.0, 1.5}) and writes a table and a plot;
``--do_train false`` only evaluates the model as loaded. Every comparison starts with the
model before training. Each run writes ``<run dir>/metrics.json`` (args, run, eval, test,
train) and appends a section to ``results.md``. See docs/training.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
import time

from . import train_report
from .text_data import GENERATED, load_raw_splits, tokenize_splits, train_tokenizer
from .train_env import LoadProbe, layout_text, load_text, world_layout

TINY = "tiny"
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Defaults that differ between the built-in tiny preset and a pretrained (seed-style) run.
PRESETS = {
    "tiny": dict(block_size=64, per_device_train_batch_size=16, per_device_eval_batch_size=32, num_train_epochs=6.0,
                 learning_rate=3e-3, warmup_ratio=0.05, logging_steps=25),
    "pretrained": dict(block_size=256, per_device_train_batch_size=2, per_device_eval_batch_size=2, num_train_epochs=1.0,
                       learning_rate=5e-5, warmup_ratio=0.0, logging_steps=10),
}


def _topk(value: str):
    if value.lower() in ("none", "0", "all", "full"):
        return None
    k = int(value)
    if k < 1:
        raise argparse.ArgumentTypeError("--cos_topk: expected an int >= 1, or 'none' for the whole vocabulary")
    return k


def _bool(value: str) -> bool:
    """``true``/``false`` (and yes/no, 1/0), as transformers' ``HfArgumentParser`` reads a bool."""
    lowered = str(value).lower()
    if lowered in ("true", "yes", "1", "t", "y"):
        return True
    if lowered in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _json_dict(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({error})") from error
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _add_bool(group, name: str, default, help: str) -> None:
    """A flag that alone means true and takes an explicit ``true``/``false`` (``--do_train false``)."""
    group.add_argument(name, type=_bool, nargs="?", const=True, default=default, metavar="{true,false}", help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_cosloss.train",
        description="Fine-tune or train a causal LM with cross-entropy mixed with an embedding-space cosine loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model_name", "--model_name_or_path", dest="model_name", default=TINY,
                   help=f"a model id or local path (for --gguf_file: the folder that holds it), or '{TINY}': a small "
                        "GPT-2 built here")
    g.add_argument("--gguf_file", default=None,
                   help="a GGUF checkpoint: a path, or a file name inside --model_name; loaded as an ordinary float "
                        "model (dequantised) with its tokenizer")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer id or path (default: the model's; for 'tiny', a "
                   "byte-level BPE trained on the training text)")
    g.add_argument("--from_scratch", action="store_true", help="random initialisation from the model's config")
    g.add_argument("--tiny_n_embd", type=int, default=64)
    g.add_argument("--tiny_n_layer", type=int, default=2)
    g.add_argument("--tiny_n_head", type=int, default=2)
    g.add_argument("--tiny_vocab_size", type=int, default=1024, help="BPE vocabulary size limit for the tiny model")
    g.add_argument("--embedding", default="tied", choices=("tied", "input", "output"),
                   help="the embedding of the cosine term: 'tied' requires the input embedding to be the LM head")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=GENERATED, help=f"a datasets id, or '{GENERATED}': the built-in corpus")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--text_field", default="text")
    g.add_argument("--train_file", default=None, help="local .txt, .json/.jsonl or .parquet (replaces --dataset_name)")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--test_file", default=None)
    _add_bool(g, "--keep_linebreaks", True, "keep the line breaks of .txt files (each line ends in its break, as "
              "run_clm.py); false joins the lines with nothing between them")
    g.add_argument("--subset_train", type=int, default=None, help="keep the first N rows of the training split")
    g.add_argument("--subset_val", type=int, default=None)
    g.add_argument("--subset_test", type=int, default=None)
    g.add_argument("--validation_split_percentage", type=float, default=5.0,
                   help="share of the training rows held out when there is no validation split")
    g.add_argument("--generated_sentences", type=int, default=6000,
                   help="training sentences of the generated corpus (validation and test get 10%% each)")
    g.add_argument("--block_size", type=int, default=None, help="tokens per training sequence (tiny: 64, else 256)")

    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the cosine term; when not given, runs baseline (0) and mixed (0.5) and compares")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--cos_topk", type=_topk, default=256, help="K of the top-k softmax; 'none' = whole vocabulary")
    g.add_argument("--alpha_warmup", type=float, default=0.0,
                   help="ramp alpha linearly from 0 over this fraction of the training steps")
    g.add_argument("--detach_cos_embedding", action="store_true",
                   help="no direct gradient from the cosine term into the embedding (it acts through the logits)")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "native", "triton"))
    g.add_argument("--fused_linear", action="store_true",
                   help="compute the loss from the hidden states and the LM head weight, never building [B, T, V] "
                        "logits (fused_cosloss.linear_mixed_loss)")

    g = p.add_argument_group("training (Trainer arguments; tiny / pretrained defaults when not given)")
    _add_bool(g, "--do_train", True, "train; false only evaluates the model as loaded (its 'pretrained' rows)")
    _add_bool(g, "--eval_pretrained", True, "evaluate the model before training: the first rows of every comparison")
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None)
    g.add_argument("--num_train_epochs", type=float, default=None)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the norm of the whole gradient (CE and cosine parts together) to this; 0: no clipping")
    g.add_argument("--lr_scheduler_type", default="linear",
                   help="the Trainer's schedule: linear (to 0 at the last step), cosine, constant, "
                        "constant_with_warmup, inverse_sqrt, ...")
    g.add_argument("--lr_scheduler_kwargs", type=_json_dict, default=None,
                   help="extra arguments of the schedule, as JSON (e.g. '{\"min_lr\": 1e-6}' for cosine_with_min_lr)")
    g.add_argument("--warmup_ratio", type=float, default=None,
                   help="linear warm-up over this fraction of the steps (tiny: 0.05, pretrained: 0)")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up over this many steps "
                   "(instead of --warmup_ratio)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--eval_strategy", default="no", choices=("no", "steps", "epoch"),
                   help="evaluations during training (the final evaluation always runs)")
    g.add_argument("--eval_steps", type=int, default=None)
    g.add_argument("--logging_steps", type=int, default=None)
    _add_bool(g, "--disable_tqdm", None, "no progress bars (default: none when stderr is not a terminal, so that a "
              "log file gets plain lines; the training logs are printed instead)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads (tiny: 1, as its 64-wide matrices gain nothing from more and suffer "
                        "badly on a shared machine; otherwise torch's default). Under heavy load fewer can be faster: "
                        "SmolLM2-135M on a busy 2-core machine once trained 3-4x faster with 1 than with 2")
    g.add_argument("--no_grad_norm_probe", action="store_true",
                   help="do not measure the gradient norm of each loss part at logging steps")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="runs/cosloss")
    g.add_argument("--results_file", default=None, help="markdown file the run sections are appended to "
                   "(default: <output_dir>/results.md)")
    g.add_argument("--save_model", action="store_true", help="save the trained model and tokenizer in the run dir")
    g.add_argument("--save_dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype of the saved weights: auto = the dtype the model trained in")
    g.add_argument("--compare", action="store_true", help="run the alpha x temperature grid, write a table and a plot")
    g.add_argument("--compare_alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    g.add_argument("--compare_temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.gguf_file == "":  # e.g. --gguf_file "$(python -m fused_cosloss.gguf_model --find ...)" that failed
        raise SystemExit("--gguf_file: got an empty path")
    if args.gguf_file:  # found before anything loads; the model's folder is then the file's
        from .gguf_model import resolve_gguf

        args.gguf_file = resolve_gguf(args.gguf_file, None if args.model_name == TINY else args.model_name)
        args.model_name = os.path.dirname(args.gguf_file)
    if args.warmup_steps is not None:
        if args.warmup_ratio:
            raise SystemExit("--warmup_steps and --warmup_ratio: give one of them")
        if args.warmup_steps < 0:
            raise SystemExit(f"--warmup_steps: expected an int >= 0, got {args.warmup_steps}")
        args.warmup_ratio = 0.0
    preset = PRESETS["tiny" if args.model_name == TINY else "pretrained"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results_file is None:
        args.results_file = os.path.join(args.output_dir, "results.md")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"--alpha: expected a value in [0, 1], got {args.alpha}")
    if not 0.0 <= args.alpha_warmup <= 1.0:
        raise SystemExit(f"--alpha_warmup: expected a fraction in [0, 1], got {args.alpha_warmup}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise SystemExit(f"--warmup_ratio: expected a fraction in [0, 1), got {args.warmup_ratio}")
    if not args.max_grad_norm >= 0.0:
        raise SystemExit(f"--max_grad_norm: expected a norm >= 0 (0: no clipping), got {args.max_grad_norm}")
    return args


def check_scheduler(name: str) -> None:
    """A clear error for an unknown ``--lr_scheduler_type``, before anything loads."""
    from transformers import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        choices = ", ".join(member.value for member in SchedulerType)
        raise SystemExit(f"--lr_scheduler_type: expected one of {choices}; got {name!r}") from None


# ---- model --------------------------------------------------------------------------------------

def is_pretrained(args) -> bool:
    """Whether the model starts from trained weights (its rows before training are 'pretrained')."""
    return args.model_name != TINY and not args.from_scratch


def build_model_and_tokenizer(args, train_texts):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if args.model_name == TINY:
        if args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        else:
            tokenizer = train_tokenizer(train_texts, args.tiny_vocab_size)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=args.block_size, n_embd=args.tiny_n_embd,
            n_layer=args.tiny_n_layer, n_head=args.tiny_n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
    elif args.gguf_file:
        from .gguf_model import load_gguf

        model, tokenizer = load_gguf(args.gguf_file, from_scratch=args.from_scratch)
        if args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name)
        if args.from_scratch:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_name))
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model_name)
    if args.model_name != TINY and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit and args.block_size > limit:
        print(f"--block_size {args.block_size} exceeds the model's {limit} positions; using {limit}")
        args.block_size = limit
    return model, tokenizer


def _describe_model(args, model) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    if args.model_name == TINY:
        return (f"tiny GPT-2 from scratch (n_embd={args.tiny_n_embd}, n_layer={args.tiny_n_layer}, V={vocab}, "
                f"{n_params / 1e6:.2f}M params, tied embeddings)")
    name = args.gguf_file if args.gguf_file else args.model_name
    return f"{name} ({'from scratch' if args.from_scratch else 'pretrained'}, V={vocab}, {n_params / 1e6:.1f}M params)"


def _describe_data(args) -> str:
    if args.train_file:
        files = ", ".join(f for f in (args.train_file, args.validation_file, args.test_file) if f)
        return f"local files: {files} (field: {args.text_field})"
    if args.dataset_name == GENERATED:
        return f"generated corpus ({args.generated_sentences} training sentences; field: {args.text_field})"
    return f"{args.dataset_name} / {args.dataset_config_name} (field: {args.text_field})"


# ---- one run ------------------------------------------------------------------------------------

def training_arguments(args, run_dir: str):
    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = dict(
        output_dir=run_dir, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lr_scheduler_type=args.lr_scheduler_type,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed, fp16=args.fp16, bf16=args.bf16,
        eval_strategy=args.eval_strategy, logging_strategy="steps", logging_steps=args.logging_steps,
        save_strategy="no", report_to="none", disable_tqdm=args.disable_tqdm, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without CUDA: use_cpu makes torchrun / accelerate launch give CPU data parallelism (gloo)
        use_cpu=not torch.cuda.is_available(),
    )
    if args.lr_scheduler_kwargs:
        kwargs["lr_scheduler_kwargs"] = args.lr_scheduler_kwargs
    if args.eval_steps is not None:
        kwargs["eval_steps"] = args.eval_steps
    if args.warmup_steps:
        kwargs["warmup_steps"] = int(args.warmup_steps)
    elif "warmup_ratio" in fields:  # transformers 4.x
        kwargs["warmup_ratio"] = args.warmup_ratio
    elif args.warmup_ratio:  # 5.x: a warmup_steps below 1 is a ratio
        kwargs["warmup_steps"] = min(float(args.warmup_ratio), 0.999)
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def schedule_record(training_args, max_steps: int) -> dict:
    """The optimiser schedule the Trainer ran: clipping, the scheduler and the warm-up in steps."""
    return {
        "max_grad_norm": training_args.max_grad_norm,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "lr_scheduler_kwargs": training_args.lr_scheduler_kwargs or {},
        "learning_rate": training_args.learning_rate,
        "warmup_steps": training_args.get_warmup_steps(max_steps),
        "max_steps": max_steps,
    }


def resolved_backend(name: str, embedding) -> str:
    """The backend that actually computes the loss for ``name`` on these tensors."""
    from . import backends

    if name != "auto":
        return name
    choice = backends._auto_choice(embedding)
    return choice if backends.why_unavailable(choice, embedding, embedding) is None else "reference"


@dataclasses.dataclass
class Run:
    """A model (trained or not) with what evaluating it needs."""

    trainer: object
    loss_fn: object
    data: dict
    tokenizer: object
    description: dict


def prepare_run(args, alpha: float, temperature: float, run_dir: str, prepared: dict) -> Run:
    """The model, its data, the loss and a Trainer for one run, nothing trained yet."""
    import torch
    from transformers import Trainer, default_data_collator, set_seed

    from .hf import MixedLossForTrainer, pad_for_distributed_eval

    set_seed(args.seed)
    raw = prepared["raw"]
    model, tokenizer = build_model_and_tokenizer(args, raw["train"][args.text_field])
    data = tokenize_splits(raw, tokenizer, args.text_field, args.block_size, keep_linebreaks=args.keep_linebreaks)
    loss_fn = MixedLossForTrainer(
        model, embedding=args.embedding, alpha=alpha, temperature=temperature, topk=args.cos_topk,
        backend=args.backend, alpha_warmup=args.alpha_warmup, embedding_grad=not args.detach_cos_embedding,
        probe_grad_norms=not args.no_grad_norm_probe, fused_linear=args.fused_linear,
    )
    training_args = training_arguments(args, run_dir)
    if training_args.world_size > 1:  # exact loss-pass metrics under data parallelism (see pad_for_distributed_eval)
        for split in ("validation", "test"):
            if split in data:
                data[split] = pad_for_distributed_eval(data[split], args.per_device_eval_batch_size, training_args.world_size)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=default_data_collator, **loss_fn.trainer_kwargs(),
    )
    world = world_layout(training_args, torch.get_num_threads())
    if "world" not in prepared and is_main_process():
        print(layout_text(world), flush=True)
    prepared["world"] = world
    description = {
        "model": _describe_model(args, model), "data": _describe_data(args),
        "backend": resolved_backend(args.backend, loss_fn.get_embedding().to(trainer.args.device)),
        "device": str(trainer.args.device), "torch": torch.__version__, "world": world,
        "pretrained": is_pretrained(args),
    }
    return Run(trainer, loss_fn, data, tokenizer, description)


def evaluate_before_training(args, run: Run, temperatures, prepared: dict) -> list[dict]:
    """The model as loaded, evaluated at each temperature (alpha 0: its loss is the CE): the
    'pretrained' rows. Written to ``<output_dir>/pretrained`` (``pretrained_T<T>`` for several T),
    or to ``<output_dir>`` itself when only evaluating at one temperature."""
    if "pretrained" in prepared:
        return prepared["pretrained"]
    fn = run.loss_fn
    alpha, temperature = fn.current_alpha, fn.temperature
    fn.current_alpha = 0.0
    results = []
    for t in temperatures:
        if not args.do_train and len(temperatures) == 1:
            run_dir = args.output_dir
        else:
            run_dir = os.path.join(args.output_dir, "pretrained" if len(temperatures) == 1 else f"pretrained_T{_tag(t)}")
        probe = prepared["load"]
        probe.start()
        results.append(evaluate_run(args, run, None, t, run_dir, {}, trained=False, load_probe=probe))
    fn.current_alpha, fn.temperature = alpha, temperature
    prepared["pretrained"] = results
    return results


def train_run(args, alpha: float, temperature: float, run_dir: str, prepared: dict) -> tuple[dict, Run]:
    """Train one model with this alpha and temperature (the first run of the script also evaluates it
    before training); evaluate it; write metrics.json and results.md."""
    run = prepare_run(args, alpha, temperature, run_dir, prepared)
    if args.eval_pretrained:
        evaluate_before_training(args, run, prepared["temperatures"], prepared)
    trainer = run.trainer
    if is_main_process():
        print(f"\n=== {run_dir}: alpha={alpha} T={temperature} K={args.cos_topk} backend={args.backend} "
              f"({run.description['backend']}); {len(run.data['train'])} training blocks of {args.block_size} "
              "tokens ===", flush=True)
    probe = prepared["load"]
    probe.start()
    train_result = trainer.train()
    train_metrics = dict(train_result.metrics)
    train_metrics["global_step"] = trainer.state.global_step
    train_metrics["schedule"] = schedule_record(trainer.args, trainer.state.max_steps)
    train_metrics["log_history"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = evaluate_run(args, run, alpha, temperature, run_dir, train_metrics, load_probe=probe)
    return metrics, run


def save_dtype(name: str, model):
    """The torch dtype ``--save_dtype`` names; ``auto``: the dtype of the model's parameters."""
    import torch

    if name == "auto":
        return next(model.parameters()).dtype
    return getattr(torch, name)


def save_model(run: Run, run_dir: str, dtype_name: str) -> dict | None:
    """Save the model (in ``dtype_name``) and the tokenizer; the model in training is left as it is."""
    trainer = run.trainer
    if not trainer.args.should_save:
        return None
    model = trainer.model
    dtype = save_dtype(dtype_name, model)
    to_save = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    to_save.save_pretrained(run_dir)
    run.tokenizer.save_pretrained(run_dir)
    return {"dir": run_dir, "dtype": str(dtype).replace("torch.", "")}


def evaluate_run(args, run: Run, alpha: float | None, temperature: float, run_dir: str, train_metrics: dict,
                 shared_from: str | None = None, trained: bool = True, load_probe: LoadProbe | None = None,
                 load_record: dict | None = None) -> dict:
    """Evaluate (validation, test) at this temperature; write metrics.json; append to results.md.

    ``trained=False``: the model before training (``alpha`` None). ``load_probe``, started before
    the run, is stopped after this evaluation: the load average around the run goes in ``run.load``
    (``load_record``: the load of the run that trained a shared model).
    """
    run.loss_fn.temperature = temperature
    eval_metrics = run.trainer.evaluate(run.data["validation"], metric_key_prefix="eval")
    test_metrics = run.trainer.evaluate(run.data["test"], metric_key_prefix="test") if "test" in run.data else {}
    embedding = None
    if args.dataset_name == GENERATED and not args.train_file:
        from . import corpus

        groups = corpus.group_token_ids(run.tokenizer)
        embedding = corpus.group_similarity(run.loss_fn.get_embedding(), groups)
    run_args = dict(vars(args), alpha=alpha, temperature=temperature)
    description = dict(run.description, run_dir=run_dir, trained=trained)
    if load_probe is not None:
        load_record = load_probe.stop()
    if load_record is not None:
        description["load"] = load_record
    metrics = {"args": run_args, "run": description, "eval": eval_metrics, "test": test_metrics, "train": train_metrics}
    if embedding is not None:
        metrics["embedding_groups"] = embedding
    if shared_from:
        metrics["run"]["training_shared_with"] = shared_from
    if trained and args.save_model and not shared_from:
        metrics["run"]["saved"] = save_model(run, run_dir, args.save_dtype)
    if run.trainer.is_world_process_zero():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2, default=str)
        append_results(args.results_file, run_section(args, metrics))
    return metrics


def _short(metrics: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def run_section(args, m: dict) -> str:
    a, tr, run = m["args"], m["train"], m["run"]
    schedule = tr.get("schedule", {})
    lines = [
        f"## Run: {run['run_dir']}" + ("" if run.get("trained", True) else " (before training)"),
        f"- Model: {run['model']}",
        f"- Dataset: {run['data']}",
        f"- Block size: {a['block_size']} | Alpha: {a['alpha']} | Temp: {a['temperature']} | TopK: {a['cos_topk']} | "
        f"Alpha warm-up: {a['alpha_warmup']} | Backend: {a['backend']} ({run['backend']}) on {run['device']}",
    ]
    if run.get("trained", True) and not run.get("training_shared_with"):
        lines.append(
            f"- Train steps: {tr.get('global_step')} | Epochs: {a['num_train_epochs']} | LR: {a['learning_rate']} "
            f"({schedule.get('lr_scheduler_type')}, warm-up {schedule.get('warmup_steps')} steps) | Max grad norm: "
            f"{schedule.get('max_grad_norm')} | BS train/eval: {a['per_device_train_batch_size']}/"
            f"{a['per_device_eval_batch_size']} | Grad accum: {a['gradient_accumulation_steps']} | "
            f"Train time: {tr.get('train_runtime', float('nan')):.1f} s")
    if "load" in run:
        lines.append(f"- Machine: {layout_text(run['world']).splitlines()[0]}; {load_text(run['load'])}")
    lines.append(f"- Eval metrics: {json.dumps(_short(m['eval']))}")
    if m["test"]:
        lines.append(f"- Test metrics: {json.dumps(_short(m['test']))}")
    if "embedding_groups" in m:
        e = m["embedding_groups"]
        lines.append(f"- Embedding groups (cosine of interchangeable words): within={e['within']:.4f}, "
                     f"between={e['between']:.4f}, separation={e['separation']:.4f}")
    if run.get("training_shared_with"):
        lines.append(f"- Training shared with {run['training_shared_with']} (alpha=0 does not depend on T); "
                     "evaluated at this temperature")
    return "\n".join(lines) + "\n"


def append_results(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a") as handle:
        if new:
            handle.write("# Experiment Results\n\nRuns of `python -m fused_cosloss.train` (fused_cosloss).\n")
        handle.write("\n\n" + text)


# ---- comparisons --------------------------------------------------------------------------------

comparison_table = train_report.comparison_table
pair_summary = train_report.pair_summary
collapse_note = train_report.collapse_note
plot_comparison = train_report.plot_comparison


def write_comparison(args, results: list[dict], kind: str, title: str) -> str:
    """Print-ready text of a comparison; the main process also writes comparison.md / .json / .png
    and appends the text to results.md."""
    comparison = {"kind": kind, "title": title, "runs": results}
    text = train_report.comparison_report(comparison)
    if not is_main_process():
        return text
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "comparison.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as handle:
        json.dump(comparison, handle, indent=2, default=str)
    png = plot_comparison(results, os.path.join(args.output_dir, "comparison.png")) if kind != "eval" else None
    if png:
        text += f"\nPlot: {png}\n"
    append_results(args.results_file, text)
    return text


def _tag(value: float) -> str:
    return f"{value:g}"


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Turn the progress bars of transformers and datasets off (and back on after) when not ``enabled``."""
    if enabled:
        yield
        return
    import datasets
    import transformers

    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()


def main(argv=None) -> list[dict]:
    import torch

    args = resolve_defaults(build_parser().parse_args(argv))
    for package in ("transformers", "datasets", "tokenizers"):
        try:
            __import__(package)
        except ImportError as error:
            raise SystemExit(f"{error}: the training script needs transformers, datasets and tokenizers "
                             "(python -m pip install -c constraints.txt -e '.[train]')") from error
    check_scheduler(args.lr_scheduler_type)
    if args.disable_tqdm is None:  # progress bars only where '\r' redraws them: a terminal
        args.disable_tqdm = not sys.stderr.isatty()
    threads = torch.get_num_threads()
    if args.num_threads is None and args.model_name == TINY and not torch.cuda.is_available():
        args.num_threads = 1
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        with progress_bars(not args.disable_tqdm):
            return _main(args)
    finally:
        torch.set_num_threads(threads)
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    abort a worker ("terminate called without an active exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _busy_threads() -> int:
    """Threads this script keeps busy on the machine: torch threads times processes on this node."""
    import torch

    return torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _main(args) -> list[dict]:
    started = time.time()
    temperatures = args.compare_temperatures if args.compare else [args.temperature]
    prepared = {"raw": load_raw_splits(args), "temperatures": temperatures, "load": LoadProbe(_busy_threads())}
    if not args.do_train:
        run = prepare_run(args, 0.0, temperatures[0], args.output_dir, prepared)
        results = evaluate_before_training(args, run, temperatures, prepared)
        kind, title = "eval", f"Before training (K={args.cos_topk})"
    elif args.compare:
        results, kind, title = _grid(args, prepared), "grid", f"Comparison: alpha x temperature (K={args.cos_topk})"
    elif args.alpha is None:
        results = []
        for name, alpha in (("baseline", 0.0), ("mixed", 0.5)):
            run_dir = os.path.join(args.output_dir, f"{name}_a{_tag(alpha)}")
            results.append(train_run(args, alpha, args.temperature, run_dir, prepared)[0])
        kind, title = "pair", f"Baseline vs Mixed (alpha=0.5, T={args.temperature:g}, K={args.cos_topk})"
    else:
        results = [train_run(args, args.alpha, args.temperature, args.output_dir, prepared)[0]]
        kind, title = "single", f"Run: alpha={args.alpha:g}, T={args.temperature:g}, K={args.cos_topk}"
    results = prepared.get("pretrained", []) + [m for m in results if m["run"]["trained"]]
    text = write_comparison(args, results, kind, title)
    if is_main_process():
        print("\n" + text)
        print(f"Results: {args.results_file}  (total {time.time() - started:.0f} s)")
    return results


def _grid(args, prepared) -> list[dict]:
    results = []
    shared = None  # alpha = 0 trains the same model at every temperature: train it once
    for alpha in args.compare_alphas:
        for temperature in args.compare_temperatures:
            run_dir = os.path.join(args.output_dir, f"a{_tag(alpha)}_T{_tag(temperature)}")
            if alpha == 0.0 and shared is not None:
                run, first = shared
                results.append(evaluate_run(args, run, alpha, temperature, run_dir, first["train"],
                                            shared_from=first["run"]["run_dir"], load_record=first["run"].get("load")))
                continue
            metrics, run = train_run(args, alpha, temperature, run_dir, prepared)
            results.append(metrics)
            if alpha == 0.0:
                shared = (run, metrics)
    return results


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
