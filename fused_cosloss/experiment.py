"""The training script's experiment: build the model and the data, train and evaluate each run, and
compare the runs (:func:`run`, called by ``python -m fused_cosloss.train``).

Modes: ``--alpha A`` makes one run; no ``--alpha`` runs baseline and mixed (alpha 0 and 0.5);
``--compare`` runs the grid ``--compare_alphas`` x ``--compare_temperatures`` (default {0, 0.25,
0.5, 0.75} x {0.7, 1.0, 1.5}); ``--do_train false`` only evaluates the model as loaded. Every
comparison starts with the model before training. Each run writes ``<run dir>/metrics.json``
(args, run, eval, test, train; ``geometry``: :func:`fused_cosloss.geometry.embedding_geometry` of the
cosine term's table before and after, its rows split by the training split's token ids; a trained run's
``grad_norms``: the probe's per-part gradient norms at the logging steps) and appends a section to
``results.md``; the comparison is written by :func:`fused_cosloss.train_report.write_comparison`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

from . import train_report
from .text_data import GENERATED, PYDOC, load_raw_splits, tokenize_splits, train_tokenizer
from .train_args import TINY, Arguments
from .train_env import LoadProbe, layout_text, parallel_layout, world_layout

PAIR = (("baseline", 0.0), ("mixed", 0.5))


# ---- the model ----------------------------------------------------------------------------------

def is_pretrained(args: Arguments) -> bool:
    """Whether the model starts from trained weights (its rows before training are 'pretrained')."""
    return args.model.model_name_or_path != TINY and not args.model.from_scratch


def build_model_and_tokenizer(args: Arguments, train_texts):
    """The model and its tokenizer; ``--block_size`` is cut to the model's positions when it has fewer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    m = args.model
    if m.model_name_or_path == TINY:
        if m.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name)
        else:
            tokenizer = train_tokenizer(train_texts, m.tiny_vocab_size)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=args.data.block_size, n_embd=m.tiny_n_embd,
            n_layer=m.tiny_n_layer, n_head=m.tiny_n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
    elif m.gguf_file:
        from .gguf_model import load_gguf

        model, tokenizer = load_gguf(m.gguf_file, from_scratch=m.from_scratch)
        if m.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or m.model_name_or_path)
        if m.from_scratch:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m.config_name or m.model_name_or_path))
        else:
            config = {"config": AutoConfig.from_pretrained(m.config_name)} if m.config_name else {}
            model = AutoModelForCausalLM.from_pretrained(m.model_name_or_path, **config)
    if m.model_name_or_path != TINY and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit and args.data.block_size > limit:
        print(f"--block_size {args.data.block_size} exceeds the model's {limit} positions; using {limit}")
        args.data.block_size = limit
    return model, tokenizer


def describe_model(args: Arguments, model) -> str:
    m = args.model
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    if m.model_name_or_path == TINY:
        return (f"tiny GPT-2 from scratch (n_embd={m.tiny_n_embd}, n_layer={m.tiny_n_layer}, V={vocab}, "
                f"{n_params / 1e6:.2f}M params, tied embeddings)")
    name = m.gguf_file if m.gguf_file else m.model_name_or_path
    return f"{name} ({'from scratch' if m.from_scratch else 'pretrained'}, V={vocab}, {n_params / 1e6:.1f}M params)"


def describe_data(args: Arguments) -> str:
    d = args.data
    if d.train_file:
        files = ", ".join(f for f in (d.train_file, d.validation_file, d.test_file) if f)
        return f"local files: {files} (field: {d.text_field})"
    if d.dataset_name == GENERATED:
        return f"generated corpus ({d.generated_sentences} training sentences; field: {d.text_field})"
    if d.dataset_name == PYDOC:
        return f"Python's documentation (pydoc_data.topics, split by topic; field: {d.text_field})"
    return f"{d.dataset_name} / {d.dataset_config_name} (field: {d.text_field})"


# ---- one run ------------------------------------------------------------------------------------

def training_arguments(args: Arguments, run_dir: str):
    """The parsed TrainingArguments, writing to ``run_dir`` (each run has its own directory)."""
    training = copy.copy(args.training)
    training.output_dir = run_dir
    return training


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

    return backends.resolve(name, embedding, embedding).name


@dataclasses.dataclass
class Run:
    """A model (trained or not) with what evaluating it needs."""

    trainer: object
    loss_fn: object
    data: dict
    tokenizer: object
    description: dict


def prepare_run(args: Arguments, alpha: float, temperature: float, run_dir: str, prepared: dict) -> Run:
    """The model, its data, the loss and a Trainer for one run, nothing trained yet."""
    import torch
    from transformers import Trainer, default_data_collator, set_seed

    from .hf import MixedLossForTrainer, pad_for_distributed_eval

    loss, data_args = args.loss, args.data
    set_seed(args.training.seed)
    raw = prepared["raw"]
    model, tokenizer = build_model_and_tokenizer(args, raw["train"][data_args.text_field])
    data = tokenize_splits(raw, tokenizer, data_args.text_field, data_args.block_size,
                           keep_linebreaks=data_args.keep_linebreaks)
    loss_fn = MixedLossForTrainer(
        model, embedding=loss.embedding, alpha=alpha, temperature=temperature, topk=loss.cos_topk,
        backend=loss.backend, alpha_warmup=loss.alpha_warmup, embedding_grad=not loss.detach_cos_embedding,
        probe_grad_norms=not loss.no_grad_norm_probe, fused_linear=loss.fused_linear, z_loss=loss.z_loss,
    )
    training_args = training_arguments(args, run_dir)
    if training_args.world_size > 1:  # exact loss-pass metrics under data parallelism (see pad_for_distributed_eval)
        for split in ("validation", "test"):
            if split in data:
                data[split] = pad_for_distributed_eval(data[split], training_args.per_device_eval_batch_size,
                                                       training_args.world_size)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=default_data_collator, **loss_fn.trainer_kwargs(),
    )
    world = world_layout(training_args, torch.get_num_threads())
    try:
        world["parallel"] = parallel_layout(trainer)
    except ValueError as error:  # every rank raises alike: a clean stop, not a traceback per process
        raise SystemExit(f"error: {error}") from None
    if "world" not in prepared and is_main_process():
        print(layout_text(world), flush=True)
    prepared["world"] = world
    description = {
        "model": describe_model(args, model), "data": describe_data(args),
        "backend": resolved_backend(loss.backend, loss_fn.get_embedding().to(trainer.args.device)),
        "device": str(trainer.args.device), "torch": torch.__version__, "world": world,
        "pretrained": is_pretrained(args),
    }
    return Run(trainer, loss_fn, data, tokenizer, description)


def evaluate_before_training(args: Arguments, run: Run, temperatures, prepared: dict) -> list[dict]:
    """The model as loaded, evaluated at each temperature (alpha 0: its loss is the CE): the
    'pretrained' rows. Written to ``<output_dir>/pretrained`` (``pretrained_T<T>`` for several T),
    or to ``<output_dir>`` itself when only evaluating at one temperature."""
    if "pretrained" in prepared:
        return prepared["pretrained"]
    fn = run.loss_fn
    alpha, temperature = fn.current_alpha, fn.temperature
    fn.current_alpha = 0.0
    output_dir = args.training.output_dir
    table = embedding_table(run)
    extra = {"geometry": geometry_record(table, table, training_token_groups(run))}
    results = []
    for t in temperatures:
        if not args.training.do_train and len(temperatures) == 1:
            run_dir = output_dir
        else:
            run_dir = os.path.join(output_dir, "pretrained" if len(temperatures) == 1 else f"pretrained_T{_tag(t)}")
        probe = prepared["load"]
        probe.start()
        results.append(evaluate_run(args, run, None, t, run_dir, {}, trained=False, load_probe=probe, extra=extra))
    fn.current_alpha, fn.temperature = alpha, temperature
    prepared["pretrained"] = results
    return results


def train_run(args: Arguments, alpha: float, temperature: float, run_dir: str, prepared: dict) -> tuple[dict, Run]:
    """Train one model with this alpha and temperature (the first run of the script also evaluates it
    before training); evaluate it; write metrics.json and results.md."""
    run = prepare_run(args, alpha, temperature, run_dir, prepared)
    if args.loss.eval_pretrained:
        evaluate_before_training(args, run, prepared["temperatures"], prepared)
    trainer = run.trainer
    if is_main_process():
        print(f"\n=== {run_dir}: alpha={alpha} T={temperature} K={args.loss.cos_topk} backend={args.loss.backend} "
              f"({run.description['backend']}); {len(run.data['train'])} training blocks of {args.data.block_size} "
              "tokens ===", flush=True)
    groups = training_token_groups(run)
    table_before = embedding_table(run, snapshot=True)
    probe = prepared["load"]
    probe.start()
    train_result = trainer.train(resume_from_checkpoint=args.training.resume_from_checkpoint)
    train_metrics = dict(train_result.metrics)
    train_metrics["global_step"] = trainer.state.global_step
    train_metrics["schedule"] = schedule_record(trainer.args, trainer.state.max_steps)
    train_metrics["log_history"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    extra = {"geometry": geometry_record(table_before, embedding_table(run), groups),
             "grad_norms": grad_norm_series(trainer.state.log_history)}
    metrics = evaluate_run(args, run, alpha, temperature, run_dir, train_metrics, load_probe=probe, extra=extra)
    return metrics, run


# ---- what training did to the embedding ---------------------------------------------------------

def embedding_table(run: Run, snapshot: bool = False):
    """The cosine term's ``[V, H]`` embedding (the tied or input table), detached, on the CPU (``snapshot``:
    a copy that training does not change)."""
    table = run.loss_fn.get_embedding().detach()
    return table.to("cpu", copy=snapshot)


def training_token_groups(run: Run) -> dict:
    """:func:`fused_cosloss.geometry.split_by_seen` of the vocabulary by the token ids of the training split."""
    import itertools

    import torch

    from .geometry import split_by_seen

    ids = torch.tensor(list(itertools.chain.from_iterable(run.data["train"]["input_ids"])), dtype=torch.long)
    return split_by_seen(run.loss_fn.get_embedding().shape[0], ids)


def geometry_record(table_before, table_after, groups: dict) -> dict:
    """metrics.json's ``geometry``: :func:`fused_cosloss.geometry.embedding_geometry` of the table before and
    after training, over the same sample of each group (its size and seed recorded)."""
    from .geometry import SAMPLE_SIZE, embedding_geometry

    return {"sample_size": SAMPLE_SIZE, "sample_seed": 0,
            "before": embedding_geometry(table_before, groups, size=SAMPLE_SIZE, seed=0),
            "after": embedding_geometry(table_after, groups, before=table_before, size=SAMPLE_SIZE, seed=0)}


def grad_norm_series(log_history: list[dict]) -> list[dict]:
    """metrics.json's ``grad_norms``: ``{step, grad_norm_ce, grad_norm_cos}`` of each logging step where the
    probe measured the gradient norm of each loss part (the norms are those of (1 - alpha) CE and alpha cos)."""
    return [{"step": entry["step"], "grad_norm_ce": entry["grad_norm_ce"], "grad_norm_cos": entry["grad_norm_cos"]}
            for entry in log_history if "grad_norm_ce" in entry and "grad_norm_cos" in entry]


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


def evaluate_run(args: Arguments, run: Run, alpha: float | None, temperature: float, run_dir: str,
                 train_metrics: dict, shared_from: str | None = None, trained: bool = True,
                 load_probe: LoadProbe | None = None, load_record: dict | None = None,
                 extra: dict | None = None) -> dict:
    """Evaluate (validation, test) at this temperature; write metrics.json; append to results.md.

    ``trained=False``: the model before training (``alpha`` None). ``load_probe``, started before
    the run, is stopped after this evaluation: the load average around the run goes in ``run.load``
    (``load_record``: the load of the run that trained a shared model). ``extra``: more top-level entries
    of metrics.json (a trained run's ``geometry`` and ``grad_norms``).
    """
    run.loss_fn.temperature = temperature
    eval_metrics = run.trainer.evaluate(run.data["validation"], metric_key_prefix="eval")
    test_metrics = run.trainer.evaluate(run.data["test"], metric_key_prefix="test") if "test" in run.data else {}
    embedding = None
    if args.data.dataset_name == GENERATED and not args.data.train_file:
        from . import corpus

        groups = corpus.group_token_ids(run.tokenizer)
        embedding = corpus.group_similarity(run.loss_fn.get_embedding(), groups)
    run_args = dict(args.record(), alpha=alpha, temperature=temperature)
    description = dict(run.description, run_dir=run_dir, trained=trained)
    if load_probe is not None:
        load_record = load_probe.stop()
    if load_record is not None:
        description["load"] = load_record
    metrics = {"args": run_args, "run": description, "eval": eval_metrics, "test": test_metrics, "train": train_metrics}
    if embedding is not None:
        metrics["embedding_groups"] = embedding
    metrics.update(extra or {})
    if shared_from:
        metrics["run"]["training_shared_with"] = shared_from
    if trained and args.training.save_model and not shared_from:
        metrics["run"]["saved"] = save_model(run, run_dir, args.training.save_dtype)
    if run.trainer.is_world_process_zero():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2, default=str)
        train_report.append_results(args.training.results_file, train_report.run_section(metrics))
    return metrics


# ---- the comparisons ----------------------------------------------------------------------------

def _tag(value: float) -> str:
    return f"{value:g}"


def _busy_threads() -> int:
    """Threads this script keeps busy on the machine: torch threads times processes on this node."""
    import torch

    return torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def run(args: Arguments) -> list[dict]:
    """The runs the arguments ask for (evaluation only, the grid, the pair or one run), compared; every
    run's metrics, the model before training first."""
    started = time.time()
    loss, output_dir = args.loss, args.training.output_dir
    temperatures = loss.compare_temperatures if loss.compare else [loss.temperature]
    prepared = {"raw": load_raw_splits(args.data, args.training.seed), "temperatures": temperatures,
                "load": LoadProbe(_busy_threads())}
    if not args.training.do_train:
        first = prepare_run(args, 0.0, temperatures[0], output_dir, prepared)
        results = evaluate_before_training(args, first, temperatures, prepared)
        kind, title = "eval", f"Before training (K={loss.cos_topk})"
    elif loss.compare:
        results, kind, title = grid(args, prepared), "grid", f"Comparison: alpha x temperature (K={loss.cos_topk})"
    elif loss.alpha is None:
        results = []
        for name, alpha in PAIR:
            run_dir = os.path.join(output_dir, f"{name}_a{_tag(alpha)}")
            results.append(train_run(args, alpha, loss.temperature, run_dir, prepared)[0])
        kind, title = "pair", f"Baseline vs Mixed (alpha=0.5, T={loss.temperature:g}, K={loss.cos_topk})"
    else:
        results = [train_run(args, loss.alpha, loss.temperature, output_dir, prepared)[0]]
        kind, title = "single", f"Run: alpha={loss.alpha:g}, T={loss.temperature:g}, K={loss.cos_topk}"
    results = prepared.get("pretrained", []) + [m for m in results if m["run"]["trained"]]
    text = train_report.write_comparison(output_dir, args.training.results_file, results, kind, title,
                                         write=is_main_process())
    if is_main_process():
        print("\n" + text)
        print(f"Results: {args.training.results_file}  (total {time.time() - started:.0f} s)")
    return results


def grid(args: Arguments, prepared: dict) -> list[dict]:
    """Train and evaluate every alpha x temperature of the grid."""
    results = []
    shared = None  # alpha = 0 trains the same model at every temperature: train it once
    for alpha in args.loss.compare_alphas:
        for temperature in args.loss.compare_temperatures:
            run_dir = os.path.join(args.training.output_dir, f"a{_tag(alpha)}_T{_tag(temperature)}")
            if alpha == 0.0 and shared is not None:
                shared_run, first = shared
                shared_extra = {key: first[key] for key in ("geometry", "grad_norms") if key in first}
                results.append(evaluate_run(args, shared_run, alpha, temperature, run_dir, first["train"],
                                            shared_from=first["run"]["run_dir"], load_record=first["run"].get("load"),
                                            extra=shared_extra))
                continue
            metrics, trained_run = train_run(args, alpha, temperature, run_dir, prepared)
            results.append(metrics)
            if alpha == 0.0:
                shared = (trained_run, metrics)
    return results


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0
