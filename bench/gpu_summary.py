"""summary.md of a GPU session, generated from its result files (never typed by hand).

    python bench/gpu_summary.py RESULTS_DIR       # rewrite RESULTS_DIR/summary.md from the files there

bench/gpu_session.py writes it before the first step and after every step; it can also be
regenerated here from the files a device call brought back. It reads whatever files exist
(a step that was stopped may have left none, or a partial one) and says what is missing.
Every timing is set against its target from the issues (3: the Triton kernel, 7: the
fused-linear mode); the session's own steps, checks and tests are listed with their status.
Standard library only: it never imports torch.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import report  # noqa: E402  (json and math only)

# The results folder of a session: these files and no other (the device tool brings back at most 8).
FILES = ("summary.md", "steps.jsonl", "session.log", "device.json", "checks.jsonl", "bench.json", "stages.json",
         "linear.json")
MEMORY_SHARE = 0.05
MIXED_MODE = "fwd+bwd"


# --------------------------------------------------------------------------- reading

def read_json(path: str):
    """The JSON in ``path``; None when missing, {"unreadable": why} when cut off or invalid."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        return {"unreadable": f"{type(error).__name__}: {error}"}


def read_lines(path: str) -> list[dict]:
    """The JSON records of a .jsonl file (a line cut off by a kill is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return records


def latest(records: list[dict], key) -> dict:
    """The last record of each key, in first-seen order (a 'started' is replaced by its outcome)."""
    found: dict = {}
    for record in records:
        found[key(record)] = record
    return found


# --------------------------------------------------------------------------- formatting helpers

def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _gbps(value) -> str:
    return "-" if not value else f"{value / 1e9:,.0f} GB/s"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _verdict(ok) -> str:
    return "not measured" if ok is None else "met" if ok else "**NOT MET**"


# --------------------------------------------------------------------------- sections

def header(session: dict | None, device: dict | None) -> list[str]:
    title = "# GPU session"
    machine = (device or {}).get("machine") or {}
    if machine.get("device_name"):
        title += f": {machine['device_name']}"
    lines = [title, ""]
    if session and session.get("dry"):
        lines += ["**DRY RUN** on CPU: tiny shapes, the Triton interpreter. It checks the session's plumbing; "
                  "no number below is a GPU number or means anything.", ""]
    if session:
        lines.append(f"- {session.get('date')}; `{session.get('command')}`; budget {session.get('budget_s')} s "
                     f"(caps: {', '.join(f'{k} {v}' for k, v in session.get('caps', {}).items())})")
    commit = (device or {}).get("commit") or {}
    if commit:
        dirty = f", {commit.get('modified_files')} modified files" if commit.get("modified_files") else ""
        lines.append(f"- commit {commit.get('commit')} (from {commit.get('from')}{dirty})")
    lines.append("- what to do with these results: docs/gpu.md")
    return lines + [""]


def device_section(device: dict | None) -> list[str]:
    lines = ["## Device and versions", ""]
    if device is None:
        return lines + ["device.json: not written (the `device` step did not run or did not start).", ""]
    if "unreadable" in device:
        return lines + [f"device.json unreadable: {device['unreadable']}", ""]
    machine, versions = device.get("machine") or {}, device.get("versions") or {}
    rows = []
    if machine:
        what = machine.get("device_name")
        if machine.get("device") == "cuda":
            what += (f" (compute capability {machine.get('capability')}, {machine.get('sm_count')} SMs, "
                     f"{(machine.get('gpu_memory_bytes') or 0) / 2**30:.0f} GiB, L2 {(machine.get('cache_bytes') or 0) / 2**20:.0f} MiB, "
                     f"driver {machine.get('driver')})")
        rows.append(["device", what])
        rows.append(["host", f"{machine.get('cpu')}, {machine.get('cpu_count')} CPUs"])
    if device.get("nvidia_smi"):
        rows.append(["nvidia-smi", device["nvidia_smi"]])
    if versions:
        rows.append(["versions", ", ".join(f"{name} {value}" for name, value in versions.items() if value)])
        missing = [name for name, value in versions.items() if not value and name != "cuda"]
        if missing:
            rows.append(["not installed", ", ".join(missing)])
    if device.get("copy_bytes_per_s"):
        rows.append(["copy bandwidth", f"{_gbps(device['copy_bytes_per_s'])} (bytes read + written, best of 20)"])
    gather = device.get("gather")
    shape = device.get("shape") or {}
    if gather:
        rows.append(["embedding_bag gather",
                     f"{_gbps(gather['bytes_per_s'])}: N={shape.get('tokens')} K={shape.get('topk')} rows of "
                     f"H={shape.get('hidden')} {gather['dtype']} ({gather['bytes'] / 1e9:.2f} GB) in {_ms(gather['best_ms'])} ms"
                     + (", L2 flushed before each call" if gather.get("l2_flushed") else "")])
    if device.get("gather_error"):
        rows.append(["embedding_bag in the logits' dtype", device["gather_error"]])
    floor = device.get("floor")
    if floor:
        rows.append(["floor (issue 3)", f"{_ms(floor['total_ms'])} ms = {_ms(floor['logits_ms'])} (logits read + "
                                        f"write at the copy bandwidth) + {_ms(floor['gathers_ms'])} (two K x H gathers "
                                        f"per row at the embedding_bag rate)"])
    return lines + _table(["", ""], rows) + [""]


STEP_ORDER_NOTE = "each step ends by its cumulative deadline: start + the caps of the steps up to it"


def steps_section(session: dict | None, steps: dict) -> list[str]:
    lines = ["## Steps", "", f"In priority order; {STEP_ORDER_NOTE}.", ""]
    names = list((session or {}).get("caps", {})) or list(steps)
    rows = []
    for name in names:
        record = steps.get(name)
        cap = (session or {}).get("caps", {}).get(name)
        about = (session or {}).get("about", {}).get(name, "")
        if record is None:
            rows.append([name, cap, "pending", "-", about])
            continue
        status = record["status"]
        if status == "started":
            status = f"running (or cut off), at most {record.get('timeout_s')} s"
        wall = record.get("wall_s")
        detail = record.get("detail")
        rows.append([name, cap, status + (f": {detail}" if detail and record["status"] != "ok" else ""),
                     "-" if wall is None else f"{wall:.0f}", about])
    return lines + _table(["step", "cap s", "status", "wall s", "what"], rows) + [""]


def _check_rows(records: list[dict]) -> tuple[list[list], dict]:
    checks = latest([r for r in records if r.get("kind") == "check"], key=lambda r: (r.get("unit"), r.get("name")))
    counts: dict = {}
    rows = []
    for record in checks.values():
        status = record.get("status")
        counts[status] = counts.get(status, 0) + 1
        shown = {"started": "DID NOT FINISH", "fail": "**FAIL**", "error": "**ERROR**"}.get(status, status)
        text = record.get("text") or ""
        if status in ("error", "skipped") and record.get("detail"):
            text = (text + " " + record["detail"].splitlines()[0]).strip()
        rows.append([record.get("name"), shown, text, record.get("target", ""),
                     "-" if record.get("wall_s") is None else f"{record['wall_s']:.1f}"])
    return rows, counts


def checks_section(records: list[dict]) -> list[str]:
    lines = ["## Checks on the device (bench/gpu_checks.py)", ""]
    rows, counts = _check_rows(records)
    units = latest([r for r in records if r.get("kind") == "unit"], key=lambda r: r.get("unit"))
    if not rows and not units:
        return lines + ["No check ran.", ""]
    lines.append("Counts: " + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())) + ".")
    trouble = [f"- unit `{name}`: {record['status']}" + (f" ({record['detail']})" if record.get("detail") else "")
               for name, record in units.items() if record.get("status") not in ("done",)]
    if trouble:
        lines += ["", "Units that did not finish:", ""] + trouble
    return lines + [""] + _table(["check", "status", "measured", "target", "s"], rows) + [""]


def tests_section(records: list[dict]) -> list[str]:
    lines = ["## GPU tests (pytest -m gpu)", ""]
    tests = latest([r for r in records if r.get("kind") == "pytest"], key=lambda r: r.get("name"))
    if not tests:
        return lines + ["No test ran.", ""]
    by_step: dict = {}
    for record in tests.values():
        step = by_step.setdefault(record.get("step"), {})
        step[record["status"]] = step.get(record["status"], 0) + 1
    for step, counts in by_step.items():
        lines.append(f"- step `{step}`: " + ", ".join(f"{status} {count}" for status, count in sorted(counts.items()))
                     + " (started = did not finish: hung or cut off at the deadline)" * ("started" in counts))
    bad = [record for record in tests.values() if record["status"] in ("fail", "error", "started")]
    if bad:
        lines += ["", "Failed, errored or unfinished:", ""]
        for record in bad:
            detail = (record.get("detail") or "").strip().splitlines()
            lines.append(f"- `{record['name']}`: {record['status']}" + (f": {_cell(detail[-1])[:300]}" if detail else ""))
    printed = [record for record in tests.values() if record.get("printed") and record["status"] == "pass"]
    if printed:
        lines += ["", "What passing tests printed:", ""]
        lines += [f"- `{r['name']}`: {_cell(r['printed'].splitlines()[-1])[:200]}" for r in printed]
    return lines + [""]


def _timing(bench: dict | None, impl: str, tokens: int | None = None) -> dict | None:
    """The forward+backward stats of ``impl`` (at ``tokens``) when it ran, else None."""
    if not bench or "results" not in bench:
        return None
    for row in bench["results"]:
        if row["impl"] == impl and row.get("status") == "ok" and (tokens is None or row["n_tokens"] == tokens):
            return (row.get("modes") or {}).get(MIXED_MODE)
    return None


def _why_missing(bench: dict | None, impl: str) -> str:
    if bench is None:
        return "no result file (its step did not run or was cut off before the first row)"
    if "unreadable" in bench:
        return f"result file unreadable: {bench['unreadable']}"
    if impl in (bench.get("unavailable") or {}):
        return f"{impl} unavailable: {bench['unavailable'][impl]}"
    for row in bench.get("results", []):
        if row["impl"] == impl:
            return f"{impl}: {row.get('status')} {row.get('reason', '')}".strip()
    return f"{impl} did not run (cut off?)"


def targets(bench: dict | None, linear: dict | None, device: dict | None) -> list[list]:
    """[target, measured, verdict] for every timing target of issues 3 and 7."""
    rows = []

    def median(data, impl):
        stats = _timing(data, impl)
        return None if stats is None else stats["median_ms"]

    def ratio_row(text, numerator, denominator, data, bound, better_low=True, fmt="{:.2f}x"):
        num, den = median(data, numerator), median(data, denominator)
        if num is None or den is None:
            missing = numerator if num is None else denominator
            rows.append([text, _why_missing(data, missing), _verdict(None)])
            return
        value = num / den
        rows.append([text, f"{fmt.format(value)} ({numerator} {_ms(num)} ms, {denominator} {_ms(den)} ms)",
                     _verdict(value <= bound if better_low else value >= bound)])

    ratio_row("triton at least 10x faster than seed-style (issue 3)", "seed-style", "triton", bench, 10.0,
              better_low=False)
    ratio_row("triton faster than Liger CE + embedding_bag (issue 3)", "triton", "liger+embbag", bench, 1.0)
    floor = (device or {}).get("floor")
    triton = median(bench, "triton")
    if floor and triton is not None:
        value = triton / floor["total_ms"]
        rows.append(["triton within 1.3x of the floor (issue 3: logits at the copy bandwidth + two K x H gathers "
                     "at the embedding_bag rate, both measured in this session)",
                     f"{value:.2f}x ({_ms(triton)} ms / {_ms(floor['total_ms'])} ms)", _verdict(value <= 1.3)])
    else:
        rows.append(["triton within 1.3x of the floor (issue 3)",
                     "no floor (device step)" if not floor else _why_missing(bench, "triton"), _verdict(None)])
    ratio_row("alpha = 0: ce-triton at least as fast as Liger CE (issue 3)", "ce-triton", "ce-liger", bench, 1.0)
    stats = _timing(bench, "triton")
    config = (bench or {}).get("config") or {}
    if stats is not None and stats.get("extra_bytes") is not None and config:
        logits_bytes = config["tokens"][0] * config["vocab"] * (2 if config["dtype"] in ("bfloat16", "float16") else 4)
        share = stats["extra_bytes"] / logits_bytes
        rows.append(["triton's peak extra memory at most 5 % of the logits (issue 3)",
                     f"{share:.2%} ({stats['extra_bytes'] / 1e6:.1f} MB)", _verdict(share <= MEMORY_SHARE)])
    else:
        rows.append(["triton's peak extra memory at most 5 % of the logits (issue 3)", _why_missing(bench, "triton"),
                     _verdict(None)])
    fused, logits_path = _timing(linear, "linear-triton"), _timing(linear, "matmul+triton")
    if fused and logits_path and fused.get("peak_bytes_above_inputs") and logits_path.get("peak_bytes_above_inputs"):
        value = logits_path["peak_bytes_above_inputs"] / fused["peak_bytes_above_inputs"]
        tokens = ((linear or {}).get("config") or {}).get("tokens", ["?"])[0]
        rows.append([f"fused-linear peak at least 5x lower than the logits path, N={tokens} (issue 7)",
                     f"{value:.1f}x ({fused['peak_bytes_above_inputs'] / 1e6:.0f} MB vs "
                     f"{logits_path['peak_bytes_above_inputs'] / 1e6:.0f} MB)", _verdict(value >= 5)])
    else:
        missing = "linear-triton" if not fused else "matmul+triton"
        rows.append(["fused-linear peak at least 5x lower than the logits path (issue 7)",
                     _why_missing(linear, missing), _verdict(None)])
    for other in ("ce-liger-flce", "ce-cce", "ce-torch-linear"):
        ce_fused, theirs = median(linear, "ce-linear-triton"), median(linear, other)
        if ce_fused is not None and theirs is not None:
            rows.append([f"alpha = 0 from hidden states: ce-linear-triton beside {other} (issue 7: compared, no bound)",
                         f"{ce_fused / theirs:.2f}x ({_ms(ce_fused)} ms vs {_ms(theirs)} ms)", "compared"])
        else:
            rows.append([f"alpha = 0 from hidden states: ce-linear-triton beside {other} (issue 7)",
                         _why_missing(linear, "ce-linear-triton" if ce_fused is None else other), "not measured"])
    return rows


def targets_section(bench, linear, device, dry: bool) -> list[str]:
    lines = ["## Targets", ""]
    if dry:
        lines += ["(dry run: the verdicts below only show that the computation works)", ""]
    return lines + _table(["target", "measured", "verdict"], targets(bench, linear, device)) + [""]


def bench_section(bench: dict | None, title: str) -> list[str]:
    lines = [f"## {title}", ""]
    if bench is None:
        return lines + ["Not written: the step did not run, or was stopped before its first implementation.", ""]
    if "unreadable" in bench:
        return lines + [f"Unreadable: {bench['unreadable']}", ""]
    if (bench.get("meta") or {}).get("partial"):
        lines += ["**Partial**: the step was stopped before every implementation ran.", ""]
    return lines + report.format_markdown(bench).splitlines() + [""]


def stages_section(stages: dict | None, device: dict | None) -> list[str]:
    lines = ["## Stages (bench/stages.py, the default path)", ""]
    if stages is None:
        return lines + ["Not written: the step did not run or did not finish.", ""]
    if "unreadable" in stages:
        return lines + [f"Unreadable: {stages['unreadable']}", ""]
    copy = (device or {}).get("copy_bytes_per_s")
    args = stages.get("args") or {}
    lines += [f"{stages.get('device')}: N={args.get('tokens')} V={args.get('vocab')} H={args.get('hidden')} "
              f"K={args.get('topk')} {args.get('dtype')} alpha={args.get('alpha')} path={args.get('path')}, median of "
              f"{args.get('repeats')} calls; predicted bytes from docs/triton_kernel.md.", ""]
    rows = []
    itemized = 0.0
    total = None
    for row in stages.get("stages", []):
        if row["stage"] == "total":
            total = row["median_ms"]
            continue
        itemized += row["median_ms"]
        rate = row.get("gb_per_s")
        share = f"{rate * 1e9 / copy:.0%}" if rate and copy else "-"
        predicted = f"{row['predicted_bytes'] / 1e6:.1f}" if row.get("predicted_bytes") else "-"
        rows.append([row["stage"], _ms(row["median_ms"]), predicted, f"{rate:.0f}" if rate else "-", share])
    if total is not None:
        rows.append(["other (not itemized: torch ops, launches)", _ms(max(total - itemized, 0.0)), "-", "-", "-"])
        rows.append(["total", _ms(total), "-", "-", "-"])
    return lines + _table(["stage", "ms", "predicted MB", "GB/s", "of copy bandwidth"], rows) + [""]


def files_section(out: str) -> list[str]:
    present = [name for name in FILES if os.path.exists(os.path.join(out, name))]
    others = sorted(set(os.listdir(out)) - set(FILES)) if os.path.isdir(out) else []
    line = "Files: " + ", ".join(f"{name} ({os.path.getsize(os.path.join(out, name)):,} B)" for name in present)
    return ["## Files", "", line + "." + (f" Unexpected: {', '.join(others)}." if others else ""), ""]


def render(out: str) -> str:
    steps_records = read_lines(os.path.join(out, "steps.jsonl"))
    session = next((r for r in steps_records if r.get("kind") == "session"), None)
    steps = latest([r for r in steps_records if r.get("kind") == "step"], key=lambda r: r["step"])
    device = read_json(os.path.join(out, "device.json"))
    checks = read_lines(os.path.join(out, "checks.jsonl"))
    bench = read_json(os.path.join(out, "bench.json"))
    linear = read_json(os.path.join(out, "linear.json"))
    stages = read_json(os.path.join(out, "stages.json"))
    device_ok = device if device and "unreadable" not in device else None
    dry = bool(session and session.get("dry"))
    lines = (header(session, device_ok) + steps_section(session, steps) + device_section(device)
             + targets_section(bench, linear, device_ok, dry) + checks_section(checks) + tests_section(checks)
             + bench_section(bench, "Benchmark (bench.json)") + stages_section(stages, device_ok)
             + bench_section(linear, "Fused-linear rows (linear.json)") + files_section(out))
    return "\n".join(lines).rstrip() + "\n"


def headline(out: str) -> str:
    """The part of the summary that must reach whoever ran the session even when only the end of the
    output does (the device tool's reply carries the last 12,000 characters): the steps, the targets,
    and every check and test that did not pass."""
    steps_records = read_lines(os.path.join(out, "steps.jsonl"))
    session = next((r for r in steps_records if r.get("kind") == "session"), None)
    steps = latest([r for r in steps_records if r.get("kind") == "step"], key=lambda r: r["step"])
    device = read_json(os.path.join(out, "device.json"))
    device_ok = device if device and "unreadable" not in device else None
    records = read_lines(os.path.join(out, "checks.jsonl"))
    rows, counts = _check_rows(records)
    lines = header(session, device_ok) + steps_section(session, steps)
    lines += targets_section(read_json(os.path.join(out, "bench.json")), read_json(os.path.join(out, "linear.json")),
                             device_ok, bool(session and session.get("dry")))
    lines += ["## Checks that did not pass", "",
              "Counts: " + (", ".join(f"{status} {count}" for status, count in sorted(counts.items())) or "none") + "."]
    lines += [f"- {row[0]}: {row[1]}: {row[2]}" for row in rows if row[1] not in ("pass",)]
    lines += [""] + tests_section(records)[2:]
    return "\n".join(lines).rstrip() + f"\n\nEverything else: {os.path.join(out, 'summary.md')}\n"


def write(out: str) -> str:
    """Render and write ``out``/summary.md (through a temporary file, so a reader never sees half of it)."""
    text = render(out)
    path = os.path.join(out, "summary.md")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__)
        return 2
    try:
        print(write(argv[0]))
    except OSError:            # a read-only copy (the device tool's files): print it instead
        print(render(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
