"""The training script's reports: each run's section of results.md, the comparisons (tables, summaries,
the plot) and the tables of docs/training.md.

Every comparison starts with the model before training (``pretrained``; ``untrained`` for a
model trained from scratch), one row per temperature, then the trained runs.

The tables in ``docs/training.md`` are generated from the committed results
(``docs/results/training/*.json``, the ``comparison.json`` files the script writes)::

    python -m fused_cosloss.train_report            # rewrite the generated parts of docs/training.md
    python -m fused_cosloss.train_report --check    # exit 1 when they differ from what the results give

A generated part sits between ``<!-- generated: KIND FILE [FILE ...] -->`` and
``<!-- end generated -->``; KIND is ``table`` (the short columns of the rows of the files, a
row that several files share shown once) or ``output`` (what the script printed for that
comparison).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .train_env import layout_text, load_text

NAN = float("nan")


def is_trained(m: dict) -> bool:
    return m["run"].get("trained", True)


def row_label(m: dict) -> str:
    """``pretrained`` / ``untrained`` for an evaluation before training; else ``trained`` and the options
    that change what the loss does (the alpha warm-up, a detached cosine embedding)."""
    if not is_trained(m):
        return "pretrained" if m["run"].get("pretrained", True) else "untrained"
    options = []
    if m["args"].get("alpha_warmup"):
        options.append(f"--alpha_warmup {m['args']['alpha_warmup']:g}")
    if m["args"].get("detach_cos_embedding"):
        options.append("--detach_cos_embedding")
    return " ".join(["trained", *options])


def _busy(m: dict) -> bool:
    return bool(m["run"].get("load", {}).get("busy"))


def _timed(value, fmt: str, m: dict) -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}" + (" *" if _busy(m) else "")


def _alpha(m: dict) -> str:
    return "-" if m["args"].get("alpha") is None else f"{m['args']['alpha']:g}"


def _metric(section: str, key: str, fmt: str):
    return lambda m: f"{m[section].get(key, NAN):{fmt}}" if m.get(section) else "-"


COLUMNS = {
    "run": row_label,
    "alpha": _alpha,
    "T": lambda m: f"{m['args']['temperature']:g}",
    "val ce": _metric("eval", "eval_ce_loss", ".4f"),
    "val ppl": _metric("eval", "eval_perplexity", ".3f"),
    "val acc": _metric("eval", "eval_token_acc", ".4f"),
    "val cos": _metric("eval", "eval_cos_sim", ".4f"),
    "test ppl": _metric("test", "test_perplexity", ".3f"),
    "test acc": _metric("test", "test_token_acc", ".4f"),
    "test cos": _metric("test", "test_cos_sim", ".4f"),
    "emb group sep": lambda m: f"{m['embedding_groups']['separation']:.4f}" if "embedding_groups" in m else "-",
    "train s": lambda m: _timed(m["train"].get("train_runtime") if is_trained(m) else None, ".1f", m),
    "eval s": lambda m: _timed(m["eval"].get("eval_runtime"), ".2f", m),
}
FULL = list(COLUMNS)
SHORT = ["run", "alpha", "T", "val ce", "val ppl", "val acc", "val cos", "emb group sep", "train s"]


def timing_note(results: list[dict]) -> str:
    """The note that explains the ``*`` of a busy run's times."""
    busy = [m for m in results if _busy(m)]
    if not busy:
        return ""
    worst = max(busy, key=lambda m: max(m["run"]["load"]["other_load_before"], m["run"]["load"]["other_load_after"]))
    return (f"Times marked * are unreliable: other work kept more than half the cores busy during those runs "
            f"({len(busy)} of {len(results)}; the busiest: {load_text(worst['run']['load'], warn=False)})")


def shown_rows(results: list[dict], columns=FULL) -> list[tuple[str, dict]]:
    """``(markdown row, run)`` for each run, a row that is the same as an earlier one left out."""
    rows = {}
    for m in results:
        row = "| " + " | ".join(COLUMNS[name](m) for name in columns) + " |"
        rows.setdefault(row, m)
    return list(rows.items())


def comparison_table(results: list[dict], columns=FULL) -> str:
    """A markdown table, one row per run; a row that is the same as an earlier one is shown once."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, rule, *(row for row, _ in shown_rows(results, columns))])


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
        line = f"- Train time: baseline={bt:.1f} s, mixed={xt:.1f} s (x{xt / bt:.2f})"
        if _busy(base) or _busy(mixed):
            line += "; UNRELIABLE: the machine was busy (see the load average in each run's metrics.json)"
        lines.append(line)
    return "\n".join(lines)


def collapse_note(results: list[dict]) -> str:
    """A warning for runs whose token embeddings collapsed onto one direction (the trivial optimum of 1 - cos)."""
    collapsed = []
    for m in results:
        if not is_trained(m):
            continue
        sep = m.get("embedding_groups", {}).get("separation")
        if m["args"]["alpha"] > 0 and (m["eval"].get("eval_cos_sim", 0.0) > 0.99 or (sep is not None and sep < 0.02)):
            collapsed.append(f"alpha={m['args']['alpha']:g}/T={m['args']['temperature']:g}")
    if not collapsed:
        return ""
    return (f"- Collapse ({', '.join(collapsed)}): eval cos_sim > 0.99 or no group separation: the cosine term "
            "drove all token embeddings toward one direction (1 - cos is trivially 0 there, since its gradient also "
            "moves the embedding), and with the LM head tied to them the logits lose their ranking. Try "
            "--alpha_warmup, a smaller --alpha, or --detach_cos_embedding (see docs/training.md).")


def comparison_text(results: list[dict], title: str | None = None, summary: str = "") -> str:
    """The comparison as the script prints it: the table, the notes on time and collapse, the summary."""
    shown = [m for _, m in shown_rows(results)]
    notes = "\n".join(part for part in (timing_note(shown), summary, collapse_note(results)) if part)
    text = (f"## {title}\n" if title else "") + comparison_table(results) + "\n"
    if notes:
        text += "\n" + notes + "\n"
    return text


def comparison_report(comparison: dict) -> str:
    """:func:`comparison_text` of a ``comparison.json`` (``kind``, ``title``, ``runs``): a pair gets the
    seed's baseline-against-mixed summary."""
    runs = comparison["runs"]
    trained = [m for m in runs if is_trained(m)]
    summary = pair_summary(*trained) if comparison["kind"] == "pair" and len(trained) == 2 else ""
    return comparison_text(runs, comparison.get("title"), summary)


# ---- what a run writes ---------------------------------------------------------------------------

def _short(metrics: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def run_section(m: dict) -> str:
    """The section of ``results.md`` for one run's metrics (the seed's format)."""
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
    """Append ``text`` to the markdown file ``path``, which starts with a title when new."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a") as handle:
        if new:
            handle.write("# Experiment Results\n\nRuns of `python -m fused_cosloss.train` (fused_cosloss).\n")
        handle.write("\n\n" + text)


def write_comparison(output_dir: str, results_file: str, results: list[dict], kind: str, title: str,
                     write: bool = True) -> str:
    """Print-ready text of a comparison; with ``write`` (the main process) also ``comparison.md`` /
    ``.json`` / ``.png`` in ``output_dir``, and the text appended to ``results_file``."""
    comparison = {"kind": kind, "title": title, "runs": results}
    text = comparison_report(comparison)
    if not write:
        return text
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "comparison.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(output_dir, "comparison.json"), "w") as handle:
        json.dump(comparison, handle, indent=2, default=str)
    png = plot_comparison(results, os.path.join(output_dir, "comparison.png")) if kind != "eval" else None
    if png:
        text += f"\nPlot: {png}\n"
    append_results(results_file, text)
    return text


# ---- the plot -----------------------------------------------------------------------------------

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]
PANELS = [("eval", "eval_perplexity", "validation perplexity (log)", ".3g"),
          ("eval", "eval_token_acc", "validation token accuracy", ".3f"),
          ("eval", "eval_cos_sim", "validation cos(expected, gold embedding)", ".3f")]


def comparison_figure(results: list[dict]):
    """Validation metrics against alpha, one line per temperature (its own marker and line style), each
    point labelled with its value; perplexity on a log axis; the model before training as a dotted level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(PANELS)
    if all("embedding_groups" in m for m in results):
        panels.append(("embedding_groups", "separation", "embedding group separation", ".3f"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0))
    temperatures = sorted({m["args"]["temperature"] for m in results})
    for ax, (section, key, title, fmt) in zip(axes, panels):
        for index, t in enumerate(temperatures):
            color = f"C{index}"
            runs = [m for m in results if m["args"]["temperature"] == t]
            points = sorted((m["args"]["alpha"], m[section].get(key, NAN)) for m in runs if is_trained(m))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], linestyle=LINESTYLES[index % len(LINESTYLES)],
                    color=color, markersize=7 - index, label=f"T={t:g}")
            for x, y in zip(xs, ys):  # labels of different temperatures stacked, not on top of each other
                ax.annotate(f"{y:{fmt}}", (x, y), textcoords="offset points", xytext=(4, 4 + 9 * index),
                            fontsize=7, color=color)
            for m in runs:
                if not is_trained(m) and m.get(section):
                    ax.axhline(m[section].get(key, NAN), color=color, linestyle=":", linewidth=1,
                               label=f"{row_label(m)} (T={t:g})")
        if key == "eval_perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_comparison(results: list[dict], path: str) -> str | None:
    """:func:`comparison_figure` saved as a PNG; None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    import matplotlib.pyplot as plt

    fig = comparison_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the tables of docs/training.md -------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "training.md")
RESULTS = os.path.join(ROOT, "docs", "results", "training")
BLOCK = re.compile(r"(<!-- generated: (?P<kind>table|output) (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.S)


def read_comparison(results_dir: str, name: str) -> dict:
    with open(os.path.join(results_dir, name), encoding="utf-8") as handle:
        return json.load(handle)


def generated_body(kind: str, names: list[str], results_dir: str) -> str:
    """What goes between the markers: a table, or the printed comparison in a code block."""
    comparisons = [read_comparison(results_dir, name) for name in names]
    if kind == "table":
        results = [m for comparison in comparisons for m in comparison["runs"]]
        note = timing_note([m for _, m in shown_rows(results, SHORT)])
        return comparison_table(results, SHORT) + "\n" + (f"\n{note}\n" if note else "")
    return "```\n" + "\n".join(comparison_report(comparison) for comparison in comparisons) + "```\n"


def render_docs(text: str, results_dir: str = RESULTS) -> str:
    """``text`` with every generated part rewritten from the results in ``results_dir``."""
    def replace(match):
        body = generated_body(match["kind"], match["files"].split(), results_dir)
        return match.group(1) + body + match.group(5)

    return BLOCK.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_cosloss.train_report",
                                     description="Regenerate the tables of docs/training.md from the committed results.")
    parser.add_argument("doc", nargs="?", default=DOC)
    parser.add_argument("--results", default=RESULTS, help="directory of the comparison JSON files")
    parser.add_argument("--check", action="store_true", help="only report whether the document is up to date")
    args = parser.parse_args(argv)
    with open(args.doc, encoding="utf-8") as handle:
        text = handle.read()
    new = render_docs(text, args.results)
    if args.check:
        if new != text:
            print(f"{args.doc}: the generated tables differ from {args.results}; run python -m fused_cosloss.train_report")
            return 1
        print(f"{args.doc}: up to date")
        return 0
    if new != text:
        with open(args.doc, "w", encoding="utf-8") as handle:
            handle.write(new)
    print(f"{args.doc}: {len(BLOCK.findall(text))} generated parts {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
