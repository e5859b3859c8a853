"""``python -m fused_cosloss.train``: the seed experiment (CE baseline against the mixed loss) with transformers.

With no arguments it runs offline in a few minutes on a CPU: a tiny GPT-2 (tied
embeddings) trained from scratch, with a byte-level BPE tokenizer trained on the spot,
on the generated corpus of :mod:`fused_cosloss.corpus`; the baseline (alpha = 0) and the
mixed loss (alpha = 0.5) both run and the comparison prints.

The seed's run (needs the network)::

    python -m fused_cosloss.train --model_name distilgpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --text_field text

Modes: ``--alpha A`` makes one run; no ``--alpha`` runs baseline and mixed (alpha 0 and
0.5); ``--compare`` runs the grid ``--compare_alphas`` x ``--compare_temperatures``
(default {0, 0.25, 0.5, 0.75} x {0.7, 1.0, 1.5}) and writes a table and a plot.
Each run writes ``<run dir>/metrics.json`` (args, eval, test, train) and appends a
section to ``results.md``. See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from itertools import chain

TINY = "tiny"
GENERATED = "generated"
EOS = "<|endoftext|>"

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_cosloss.train",
        description="Fine-tune or train a causal LM with cross-entropy mixed with an embedding-space cosine loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=TINY, help=f"a model id or local path, or '{TINY}': a small GPT-2 built here")
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
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None)
    g.add_argument("--num_train_epochs", type=float, default=None)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--warmup_ratio", type=float, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--eval_strategy", default="no", choices=("no", "steps", "epoch"),
                   help="evaluations during training (the final evaluation always runs)")
    g.add_argument("--eval_steps", type=int, default=None)
    g.add_argument("--logging_steps", type=int, default=None)
    g.add_argument("--disable_tqdm", action="store_true")
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads (tiny: 1, as its 64-wide matrices gain nothing from more and suffer "
                        "badly on a shared machine; otherwise torch's default)")
    g.add_argument("--no_grad_norm_probe", action="store_true",
                   help="do not measure the gradient norm of each loss part at logging steps")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="runs/cosloss")
    g.add_argument("--results_file", default=None, help="markdown file the run sections are appended to "
                   "(default: <output_dir>/results.md)")
    g.add_argument("--save_model", action="store_true", help="save the trained model and tokenizer in the run dir")
    g.add_argument("--compare", action="store_true", help="run the alpha x temperature grid, write a table and a plot")
    g.add_argument("--compare_alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    g.add_argument("--compare_temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
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
    return args


# ---- data ---------------------------------------------------------------------------------------

def _builder_for(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text", ".raw")):
        return "text"
    raise SystemExit(f"{path}: expected a .txt, .json, .jsonl or .parquet file")


def load_raw_splits(args) -> dict:
    """``{"train": Dataset, "validation": Dataset, "test": Dataset or missing}`` with a text column."""
    import datasets

    splits = {}
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    if any(files.values()):
        if not args.train_file:
            raise SystemExit("--validation_file/--test_file need --train_file")
        for split, path in files.items():
            if path:
                builder = _builder_for(path)
                ds = datasets.load_dataset(builder, data_files={split: path}, split=split)
                if builder == "text" and args.text_field != "text":
                    ds = ds.rename_column("text", args.text_field)
                splits[split] = ds
    elif args.dataset_name == GENERATED:
        from . import corpus

        n = args.generated_sentences
        generated = corpus.corpus_splits(n, max(n // 10, 1), max(n // 10, 1), seed=0)
        splits = {split: datasets.Dataset.from_dict({args.text_field: docs}) for split, docs in generated.items()}
    else:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        splits = {name: loaded[name] for name in loaded}
        if "valid" in splits and "validation" not in splits:
            splits["validation"] = splits.pop("valid")
    if "train" not in splits:
        raise SystemExit(f"the dataset has no 'train' split (it has {sorted(splits)})")
    if args.text_field not in splits["train"].column_names:
        raise SystemExit(f"--text_field {args.text_field!r}: not a column of the data ({splits['train'].column_names})")
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=args.validation_split_percentage / 100.0, seed=args.seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    for split, limit in (("train", args.subset_train), ("validation", args.subset_val), ("test", args.subset_test)):
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return splits


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tokenize_splits(splits: dict, tokenizer, text_field: str, block_size: int) -> dict:
    """Tokenize, concatenate and cut into ``block_size`` blocks with causal labels (as the seed did)."""
    from .hf import causal_lm_labels

    def tokenize(batch):
        texts = [t for t in batch[text_field] if t and t.strip()]
        return {"input_ids": tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = (len(ids) // block_size) * block_size or len(ids)  # keep a short block when there is no full one
        blocks = [ids[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": causal_lm_labels(blocks)}

    out = {}
    for split, ds in splits.items():
        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
        out[split] = tokens.map(group, batched=True, batch_size=100_000, desc=f"blocks of {block_size} ({split})")
        if len(out[split]) == 0:
            raise SystemExit(f"the {split} split has no text in field {text_field!r}")
    return out


# ---- model --------------------------------------------------------------------------------------

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
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name)
        if args.from_scratch:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_name))
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model_name)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
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
    return f"{args.model_name} ({'from scratch' if args.from_scratch else 'pretrained'}, V={vocab}, {n_params / 1e6:.1f}M params)"


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
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed, fp16=args.fp16, bf16=args.bf16,
        eval_strategy=args.eval_strategy, logging_strategy="steps", logging_steps=args.logging_steps,
        save_strategy="no", report_to="none", disable_tqdm=args.disable_tqdm, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without CUDA: use_cpu makes torchrun / accelerate launch give CPU data parallelism (gloo)
        use_cpu=not torch.cuda.is_available(),
    )
    if args.eval_steps is not None:
        kwargs["eval_steps"] = args.eval_steps
    if "warmup_ratio" in fields:  # transformers 4.x
        kwargs["warmup_ratio"] = args.warmup_ratio
    elif args.warmup_ratio:  # 5.x: a warmup_steps below 1 is a ratio
        kwargs["warmup_steps"] = min(float(args.warmup_ratio), 0.999)
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def resolved_backend(name: str, embedding) -> str:
    """The backend that actually computes the loss for ``name`` on these tensors."""
    from . import backends

    if name != "auto":
        return name
    choice = backends._auto_choice(embedding)
    return choice if backends.why_unavailable(choice, embedding, embedding) is None else "reference"


@dataclasses.dataclass
class Run:
    """A trained model with what re-evaluating it needs."""

    trainer: object
    loss_fn: object
    data: dict
    tokenizer: object
    description: dict


def train_run(args, alpha: float, temperature: float, run_dir: str, prepared=None) -> tuple[dict, Run]:
    """Train one model with this alpha and temperature; evaluate it; write metrics.json and results.md."""
    import torch
    from transformers import Trainer, default_data_collator, set_seed

    from .hf import MixedLossForTrainer, pad_for_distributed_eval

    set_seed(args.seed)
    raw = prepared["raw"] if prepared else load_raw_splits(args)
    model, tokenizer = build_model_and_tokenizer(args, raw["train"][args.text_field])
    data = tokenize_splits(raw, tokenizer, args.text_field, args.block_size)
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
    backend = resolved_backend(args.backend, loss_fn.get_embedding().to(trainer.args.device))
    if is_main_process():
        print(f"\n=== {run_dir}: alpha={alpha} T={temperature} K={args.cos_topk} backend={args.backend} ({backend}); "
              f"{len(data['train'])} training blocks of {args.block_size} tokens ===", flush=True)
    train_result = trainer.train()
    run = Run(trainer, loss_fn, data, tokenizer, {
        "model": _describe_model(args, model), "data": _describe_data(args), "backend": backend,
        "device": str(trainer.args.device),
        "torch": torch.__version__,
    })
    train_metrics = dict(train_result.metrics)
    train_metrics["global_step"] = trainer.state.global_step
    train_metrics["log_history"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    if args.save_model:
        trainer.save_model(run_dir)
        tokenizer.save_pretrained(run_dir)
    metrics = evaluate_run(args, run, alpha, temperature, run_dir, train_metrics)
    return metrics, run


def evaluate_run(args, run: Run, alpha: float, temperature: float, run_dir: str, train_metrics: dict,
                 shared_from: str | None = None) -> dict:
    """Evaluate (validation, test) at this temperature; write metrics.json; append to results.md."""
    run.loss_fn.temperature = temperature
    eval_metrics = run.trainer.evaluate(run.data["validation"], metric_key_prefix="eval")
    test_metrics = run.trainer.evaluate(run.data["test"], metric_key_prefix="test") if "test" in run.data else {}
    embedding = None
    if args.dataset_name == GENERATED and not args.train_file:
        from . import corpus

        groups = corpus.group_token_ids(run.tokenizer)
        embedding = corpus.group_similarity(run.loss_fn.get_embedding(), groups)
    run_args = dict(vars(args), alpha=alpha, temperature=temperature)
    metrics = {"args": run_args, "run": dict(run.description, run_dir=run_dir), "eval": eval_metrics,
               "test": test_metrics, "train": train_metrics}
    if embedding is not None:
        metrics["embedding_groups"] = embedding
    if shared_from:
        metrics["run"]["training_shared_with"] = shared_from
    if run.trainer.is_world_process_zero():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2, default=str)
        append_results(args.results_file, run_section(args, metrics))
    return metrics


def _short(metrics: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def run_section(args, m: dict) -> str:
    a, tr = m["args"], m["train"]
    lines = [
        f"## Run: {m['run']['run_dir']}",
        f"- Model: {m['run']['model']}",
        f"- Dataset: {m['run']['data']}",
        f"- Block size: {a['block_size']} | Alpha: {a['alpha']} | Temp: {a['temperature']} | TopK: {a['cos_topk']} | "
        f"Alpha warm-up: {a['alpha_warmup']} | Backend: {a['backend']} ({m['run']['backend']}) on {m['run']['device']}",
        f"- Train steps: {tr.get('global_step')} | Epochs: {a['num_train_epochs']} | LR: {a['learning_rate']} | "
        f"BS train/eval: {a['per_device_train_batch_size']}/{a['per_device_eval_batch_size']} | "
        f"Grad accum: {a['gradient_accumulation_steps']} | Train time: {tr.get('train_runtime', float('nan')):.1f} s",
        f"- Eval metrics: {json.dumps(_short(m['eval']))}",
    ]
    if m["test"]:
        lines.append(f"- Test metrics: {json.dumps(_short(m['test']))}")
    if "embedding_groups" in m:
        e = m["embedding_groups"]
        lines.append(f"- Embedding groups (cosine of interchangeable words): within={e['within']:.4f}, "
                     f"between={e['between']:.4f}, separation={e['separation']:.4f}")
    if m["run"].get("training_shared_with"):
        lines.append(f"- Training shared with {m['run']['training_shared_with']} (alpha=0 does not depend on T); "
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

COLUMNS = [
    ("alpha", lambda m: f"{m['args']['alpha']:g}"),
    ("T", lambda m: f"{m['args']['temperature']:g}"),
    ("val ce", lambda m: f"{m['eval'].get('eval_ce_loss', float('nan')):.4f}"),
    ("val ppl", lambda m: f"{m['eval'].get('eval_perplexity', float('nan')):.3f}"),
    ("val acc", lambda m: f"{m['eval'].get('eval_token_acc', float('nan')):.4f}"),
    ("val cos", lambda m: f"{m['eval'].get('eval_cos_sim', float('nan')):.4f}"),
    ("test ppl", lambda m: f"{m['test'].get('test_perplexity', float('nan')):.3f}"),
    ("test acc", lambda m: f"{m['test'].get('test_token_acc', float('nan')):.4f}"),
    ("test cos", lambda m: f"{m['test'].get('test_cos_sim', float('nan')):.4f}"),
    ("emb group sep", lambda m: f"{m['embedding_groups']['separation']:.4f}" if "embedding_groups" in m else "-"),
    ("train s", lambda m: f"{m['train'].get('train_runtime', float('nan')):.1f}"),
    ("eval s", lambda m: f"{m['eval'].get('eval_runtime', float('nan')):.2f}"),
]


def comparison_table(results: list[dict]) -> str:
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(fn(m) for _, fn in COLUMNS) + " |" for m in results]
    return "\n".join([head, rule, *rows])


def pair_summary(base: dict, mixed: dict) -> str:
    """The seed's 'Baseline vs Mixed' bullet list."""
    lines = []
    for split, prefix in (("eval", "eval"), ("test", "test")):
        if not base[split] or not mixed[split]:
            continue
        name = "Val" if split == "eval" else "Test"
        for metric, label, fmt in (("perplexity", "perplexity", ".3f"), ("token_acc", "token_acc", ".4f"),
                                   ("cos_sim", "cos_sim", ".4f")):
            b, x = base[split].get(f"{prefix}_{metric}"), mixed[split].get(f"{prefix}_{metric}")
            if b is None or x is None:
                continue
            lines.append(f"- {name} {label}: baseline={b:{fmt}}, mixed={x:{fmt}} (Δ={x - b:+{fmt}})")
    if "embedding_groups" in base and "embedding_groups" in mixed:
        b, x = base["embedding_groups"]["separation"], mixed["embedding_groups"]["separation"]
        lines.append(f"- Embedding group separation (within - between cosine): baseline={b:.4f}, mixed={x:.4f} (Δ={x - b:+.4f})")
    bt, xt = base["train"].get("train_runtime"), mixed["train"].get("train_runtime")
    if bt and xt:
        lines.append(f"- Train time: baseline={bt:.1f} s, mixed={xt:.1f} s (x{xt / bt:.2f})")
    return "\n".join(lines)


def collapse_note(results: list[dict]) -> str:
    """A warning for runs whose token embeddings collapsed onto one direction (the trivial optimum of 1 - cos)."""
    collapsed = []
    for m in results:
        sep = m.get("embedding_groups", {}).get("separation")
        if m["args"]["alpha"] > 0 and (m["eval"].get("eval_cos_sim", 0.0) > 0.99 or (sep is not None and sep < 0.02)):
            collapsed.append(f"alpha={m['args']['alpha']:g}/T={m['args']['temperature']:g}")
    if not collapsed:
        return ""
    return (f"- Collapse ({', '.join(collapsed)}): eval cos_sim > 0.99 or no group separation: the cosine term "
            "drove all token embeddings toward one direction (1 - cos is trivially 0 there, since its gradient also "
            "moves the embedding), and with the LM head tied to them the logits lose their ranking. Try "
            "--alpha_warmup, a smaller --alpha, or --detach_cos_embedding (see docs/training.md).")


def plot_comparison(results: list[dict], path: str) -> str | None:
    """A PNG of validation metrics against alpha, one line per temperature; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    panels = [("eval", "eval_perplexity", "validation perplexity"), ("eval", "eval_token_acc", "validation token accuracy"),
              ("eval", "eval_cos_sim", "validation cos(expected, gold embedding)")]
    if all("embedding_groups" in m for m in results):
        panels.append(("embedding_groups", "separation", "embedding group separation"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    temperatures = sorted({m["args"]["temperature"] for m in results})
    for ax, (section, key, title) in zip(axes, panels):
        for t in temperatures:
            points = sorted((m["args"]["alpha"], m[section].get(key, float("nan"))) for m in results
                            if m["args"]["temperature"] == t)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"T={t:g}")
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(args, results: list[dict], title: str, summary: str = "") -> str:
    table = comparison_table(results)
    summary = "\n".join(part for part in (summary, collapse_note(results)) if part)
    text = f"## {title}\n{table}\n"
    if summary:
        text += "\n" + summary + "\n"
    if not is_main_process():
        return text
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "comparison.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as handle:
        json.dump([{k: m[k] for k in ("args", "eval", "test", "embedding_groups") if k in m}
                   | {"train_runtime": m["train"].get("train_runtime")} for m in results], handle, indent=2, default=str)
    png = plot_comparison(results, os.path.join(args.output_dir, "comparison.png"))
    if png:
        text += f"\nPlot: {png}\n"
    append_results(args.results_file, text)
    return text


def _tag(value: float) -> str:
    return f"{value:g}"


def main(argv=None) -> list[dict]:
    import torch

    args = resolve_defaults(build_parser().parse_args(argv))
    for package in ("transformers", "datasets", "tokenizers"):
        try:
            __import__(package)
        except ImportError as error:
            raise SystemExit(f"{error}: the training script needs transformers, datasets and tokenizers "
                             "(python -m pip install -c constraints.txt -e '.[train]')") from error
    threads = torch.get_num_threads()
    if args.num_threads is None and args.model_name == TINY and not torch.cuda.is_available():
        args.num_threads = 1
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
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


def _main(args) -> list[dict]:
    started = time.time()
    prepared = {"raw": load_raw_splits(args)}
    results = []
    if args.compare:
        shared = None  # alpha = 0 trains the same model at every temperature: train it once
        for alpha in args.compare_alphas:
            for temperature in args.compare_temperatures:
                run_dir = os.path.join(args.output_dir, f"a{_tag(alpha)}_T{_tag(temperature)}")
                if alpha == 0.0 and shared is not None:
                    run, first_dir, train_metrics = shared
                    results.append(evaluate_run(args, run, alpha, temperature, run_dir, train_metrics, shared_from=first_dir))
                    continue
                metrics, run = train_run(args, alpha, temperature, run_dir, prepared)
                results.append(metrics)
                if alpha == 0.0:
                    shared = (run, run_dir, metrics["train"])
        text = write_comparison(args, results, f"Comparison: alpha x temperature (K={args.cos_topk})")
    elif args.alpha is None:
        for name, alpha in (("baseline", 0.0), ("mixed", 0.5)):
            run_dir = os.path.join(args.output_dir, f"{name}_a{_tag(alpha)}")
            results.append(train_run(args, alpha, args.temperature, run_dir, prepared)[0])
        text = write_comparison(args, results, f"Baseline vs Mixed (alpha=0.5, T={args.temperature:g}, K={args.cos_topk})",
                                pair_summary(*results))
    else:
        results.append(train_run(args, args.alpha, args.temperature, args.output_dir, prepared)[0])
        text = "\n".join(part for part in (comparison_table(results), collapse_note(results)) if part) + "\n"
    if is_main_process():
        print("\n" + text)
        print(f"Results: {args.results_file}  (total {time.time() - started:.0f} s)")
    return results


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
