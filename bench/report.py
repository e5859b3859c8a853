"""What the benchmark hands back: the stdout table, the markdown table, the JSON, the plot."""
from __future__ import annotations

import decimal
import json
import math
import re

MB = 1 << 20


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _mb(value: int | None) -> str:
    if value is None:
        return "-"
    text = f"{value / MB:.0f}"
    return "0" if text == "-0" else text


def _ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def short_number(value: float) -> str:
    """The shorter of the fixed and the exponent forms that read back as ``value`` (30, 0.5, 1e-4)."""
    exact = decimal.Decimal(repr(float(value))).normalize()   # repr: the shortest digits that read back
    fixed = format(exact, "f")
    exponent = re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{value:.{len(exact.as_tuple().digits) - 1}e}")
    return exponent if len(exponent) < len(fixed) else fixed


def options_label(impl: str, options: dict) -> str:
    """``native +softcap=30,z_loss=1e-4``: how an options row is named in the tables."""
    return f"{impl} +" + ",".join(f"{name}={short_number(value)}" for name, value in options.items())


def check_text(row: dict) -> str:
    check = row.get("check")
    if row["status"] == "WRONG":
        return "WRONG"
    if check is None:
        return row["status"]
    if check.get("oracle"):
        return "oracle"
    worst = max([check["loss_rel_err"], *check["grad_err"].values()])
    return f"ok {worst:.0e}"


def wrong_text(row: dict) -> str:
    check = row["check"]
    grads = ", ".join(f"d{name} {err:.2g}" for name, err in check["grad_err"].items())
    return (f"loss {check['loss']:.6g} vs {check['loss_ref']:.6g} (rel err {check['loss_rel_err']:.2g}); "
            f"gradient errors {grads}; tolerances {check['tol_loss']:.0e} / {check['tol_grad']:.0e}")


def row_label(row: dict) -> str:
    """The implementation's name, with its loss options on an options row (``native +softcap=30``)."""
    return row.get("label", row["impl"])


def has_options(result: dict) -> bool:
    """Whether the run added options rows (bench/run.py --softcap, --z-loss, ...)."""
    return bool(result["config"].get("options"))


def table_rows(result: dict) -> list[list[str]]:
    """One line per (N, implementation, mode), in run order; rows that did not run say so
    (the details are in problem_lines). With options, a "vs plain" column before the last."""
    lines = []
    with_options = has_options(result)
    for row in result["results"]:
        base = [str(row["n_tokens"]), row_label(row), check_text(row)]
        if row["status"] != "ok":
            lines.append(base + ["not timed", "-", "-", "-", "-", "-"] + (["-"] if with_options else []))
            continue
        for mode, stats in row["modes"].items():
            spread = f"{_ms(stats['p20_ms'])}-{_ms(stats['p80_ms'])}"
            vs_plain = [_ratio(stats.get("vs_plain"))] if with_options else []
            lines.append(base + [mode, _ms(stats["median_ms"]), spread, _ratio(stats.get("over_floor")),
                                 _ratio(stats.get("speedup"))] + vs_plain + [_mb(stats.get("extra_bytes"))])
    return lines


def problem_lines(result: dict) -> list[str]:
    """Why each WRONG, OOM or failed row was not timed."""
    lines = []
    for row in result["results"]:
        if row["status"] != "ok":
            detail = wrong_text(row) if row["status"] == "WRONG" else row.get("reason", "")
            lines.append(f"N={row['n_tokens']} {row_label(row)}: {row['status']}: {detail}")
    return lines


HEADER = ["N", "impl", "check", "mode", "median ms", "p20-p80 ms", "x floor", "speedup", "extra MB"]
HEADER_OPTIONS = HEADER[:-1] + ["vs plain"] + HEADER[-1:]


def header(result: dict) -> list[str]:
    return HEADER_OPTIONS if has_options(result) else HEADER


def options_text(result: dict) -> str:
    """What the options rows are, for the report's header."""
    options = ", ".join(f"{name}={short_number(value)}" for name, value in result["config"]["options"].items())
    with_rows = sorted({row["impl"] for row in result["results"] if row.get("options")})
    without = [name for name in result["impls"] if name not in with_rows and name not in result["unavailable"]]
    return (f"loss options: each row `impl +...` is the implementation with {options}, checked against the "
            f"reference with the same options; vs plain: its median over the plain row's (same N and mode; "
            f"no speedup: the baselines compute the plain loss). Plain rows only (they take no options): "
            f"{', '.join(without) or 'none'}.")


def header_text(result: dict) -> list[str]:
    meta, machine, floor = result["meta"], result["machine"], result["floor"]
    cfg = result["config"]
    where = machine["device_name"]
    if machine["device"] == "cuda":
        where += f" (driver {machine.get('driver')}, CUDA {machine.get('cuda_runtime')})"
    else:
        where += f" ({machine['cpu_affinity'] or machine['cpu_count']} cores, {machine['torch_threads']} torch threads)"
    exp = ""
    if machine["device"] == "cpu":
        exp = (f", exp {floor['exp_elems_per_s'] / 1e9:.2f} G elem/s "
               f"({floor['exp_elems_per_s_one_thread'] / 1e9:.2f} on one thread x {floor['exp_threads']})")
    lines = [
        f"fused_cosloss benchmark on {where}",
        f"torch {machine['torch']}, triton {machine['triton']}, {meta['date']}",
        f"{cfg['dtype']}, V={cfg['vocab']} H={cfg['hidden']} K={cfg['topk']} alpha={cfg['alpha']} "
        f"T={cfg['temperature']}; {cfg['repeats']} timed repeats after {cfg['warmup']} warm-up, "
        f"median and p20-p80",
        f"floor measured now: copy {floor['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write){exp}",
        floor["formula"]["text"],
        f"  fwd: {floor['formula']['fwd']};  fwd+bwd: {floor['formula']['fwd+bwd']}"
        + ("  (x floor < 1: a kernel whose exp is cheaper than torch.exp's)" if machine["device"] == "cpu" else ""),
        "check: worst of the loss's relative error and the gradients' max|diff|/max|ref| against the reference "
        "on these inputs (WRONG rows are not timed).",
        "speedup: against seed-style for the mixed loss, against ce-torch (F.cross_entropy) for the ce-* rows "
        "(alpha=0); same N and mode.",
        "fwd: forward with inputs requiring grad (as in training); the package's logits rows (native, triton) and "
        "Liger's CE compute the gradient there (grad_in_forward), so their fwd includes it; extra MB: peak "
        "memory above the inputs, less the gradients (fwd+bwd).",
    ]
    if has_options(result):
        lines.append(options_text(result))
    if meta.get("cpu_peak_memory_unavailable"):
        lines.append(f"memory not measured: {meta['cpu_peak_memory_unavailable']}")
    if meta.get("load_before") is not None:
        cores = machine.get("cpu_affinity") or machine.get("cpu_count") or 1
        # the load after the run is mostly the benchmark's own: only the load before it says
        # that something else was running
        busy = meta["load_before"] > 0.5 * cores
        lines.append(("WARNING: the machine was busy, timings are unreliable: " if busy else "")
                     + f"load average before/after {meta['load_before']:.2f} / {meta['load_after']:.2f} "
                       f"on {cores} cores")
    return lines


def not_run_text(result: dict) -> list[str]:
    return [f"  {name}: unavailable: {reason}" for name, reason in result["unavailable"].items()]


def format_text(result: dict) -> str:
    columns = header(result)
    rows = [columns] + table_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    out = header_text(result) + [""]
    last_n = None
    for index, row in enumerate(rows):
        if index > 1 and row[0] != last_n:
            out.append("")
        last_n = row[0] if index else None
        cells = [cell.rjust(width) if i == 0 or i >= 4 else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    floors = ", ".join(f"N={p['n_tokens']} {p['mode']} {_ms(p['floor_ms'])} ms" for p in result["floor"]["per_point"])
    out += ["", f"floor: {floors}"]
    problems = problem_lines(result)
    if problems:
        out += ["not timed:"] + [f"  {line}" for line in problems]
    if result["unavailable"]:
        out += ["not run:"] + not_run_text(result)
    out.append(f"command: {result['meta']['command']}")
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    meta, machine = result["meta"], result["machine"]
    lines = [f"### Benchmark: {machine['device_name']}", ""]
    lines += [f"- {text}" for text in header_text(result)[1:]]
    columns = header(result)
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table_rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    problems = problem_lines(result)
    if problems:
        lines += ["", "Not timed:", ""] + [f"- {line}" for line in problems]
    if result["unavailable"]:
        lines += ["", "Not run:", ""] + [f"- `{name}`: {reason}" for name, reason in result["unavailable"].items()]
    lines += ["", f"Produced by `{meta['command']}` at commit {meta.get('git_commit')}."]
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as out:
        json.dump(result, out, indent=1)
        out.write("\n")


def write_plot(result: dict, path: str) -> None:
    """Time and extra memory against tokens, one line per implementation (ce-* dashed, options rows dash-dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["config"]["modes"]
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list] = {}
    styles: dict[str, str] = {}
    for row in result["results"]:
        if row["status"] == "ok" and mode in row["modes"]:
            stats = row["modes"][mode]
            point = (row["n_tokens"], stats["median_ms"], stats.get("extra_bytes"))
            series.setdefault(row_label(row), []).append(point)
            styles[row_label(row)] = "-." if row.get("options") else "--" if row["impl"].startswith("ce-") else "-"
    for name, points in series.items():
        style = styles[name]
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], style, marker="o", label=name)
        mem = [(p[0], p[2] / MB) for p in points if p[2] is not None]
        if mem:
            right.plot([m[0] for m in mem], [max(m[1], 0.1) for m in mem], style, marker="o", label=name)
    floor = [(p["n_tokens"], p["floor_ms"]) for p in result["floor"]["per_point"] if p["mode"] == mode]
    if floor:
        left.plot([f[0] for f in floor], [f[1] for f in floor], ":", color="black", label="floor")
    tokens = result["config"]["tokens"]
    for axis, title, unit in ((left, f"time, {mode}", "ms (median)"),
                              (right, f"extra memory beyond inputs and gradients, {mode}", "MB (below 0.1 shown at 0.1)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(tokens)
        axis.set_xticklabels([str(n) for n in tokens])
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_xlabel("tokens N")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    cfg, machine = result["config"], result["machine"]
    fig.suptitle(f"fused_cosloss on {machine['device_name']}: {cfg['dtype']}, V={cfg['vocab']}, H={cfg['hidden']}, "
                 f"K={cfg['topk']}, alpha={cfg['alpha']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
