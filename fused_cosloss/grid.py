"""``python -m fused_cosloss.grid``: a resumable grid of single training runs (alpha x learning rate x
seed, and variants such as the remedies), one run per invocation, and the table assembled from the
runs' metrics.json files.

::

    python -m fused_cosloss.grid run --grid smollm2 --dir runs/grid_smollm2 --next -- --max_steps 200 --block_size 128
    python -m fused_cosloss.grid run --dir runs/grid_smollm2 --all --stop_after 5400   # resume, ~2 h
    python -m fused_cosloss.grid status --dir runs/grid_smollm2
    python -m fused_cosloss.grid assemble --dir runs/grid_smollm2 --out docs/experiments.md
    python -m fused_cosloss.grid assemble --check --out docs/experiments.md   # the page against its JSON

``run --next`` trains the first run of the grid without a finished metrics.json (a run
interrupted midway has none and is redone from the start); ``run --all`` loops until none is
left (``--stop_after S``: or until S seconds have passed). A run in training is claimed by a lock
file (``<dir>/<run>.lock``, its process id inside), so several ``run`` processes may share one
directory, each taking a different run (a lock whose process is gone is taken over); without ``--grid`` and arguments,
``run`` resumes the grid recorded in the directory. Each run is one call of the training
script's main (:func:`fused_cosloss.train.main`) with one ``--alpha``, ``--learning_rate``,
``--seed`` and its own ``--output_dir``; the arguments after ``--`` go to every run. The grid,
with those arguments, is recorded in ``<dir>/grid.json``; it may grow later (more values or
variants), but a grid that would change the arguments of a finished run is refused: one table
never mixes step budgets.

``assemble`` writes three files: the aggregated numbers and every run's (JSON), the page
(markdown, rendered from that JSON alone, so ``--check`` can tell whether a committed page
matches its committed JSON) and a plot (PNG, when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time

SMOLLM2_ARGS = ["--model_name_or_path", "smollm2-135m", "--dataset_name", "pydoc"]
# the built-in tiny model on a small generated corpus: the same shape as smollm2, for tests
TINY_ARGS = ["--model_name_or_path", "tiny", "--generated_sentences", "200", "--block_size", "32",
             "--backend", "reference"]
# the remedies at the setting where alpha costs most, and two more seeds there, where the seeds spread widest
SMOLLM2_VARIANTS = {
    "": {"args": [], "also": [{"alphas": [0.0, 0.5], "learning_rates": [5e-4], "seeds": [3, 4]}]},
    "detach": {"args": ["--detach_cos_embedding", "true"], "alphas": [0.5], "learning_rates": [5e-4],
               "also": [{"seeds": [3, 4]}]},
    "warmup": {"args": ["--alpha_warmup", "0.3"], "alphas": [0.5], "learning_rates": [5e-4],
               "also": [{"seeds": [3, 4]}]},
}
BUILT_IN = {
    "smollm2": {"name": "smollm2", "args": SMOLLM2_ARGS, "alphas": [0.0, 0.1, 0.25, 0.5],
                "learning_rates": [5e-5, 5e-4], "seeds": [0, 1, 2], "variants": SMOLLM2_VARIANTS},
    "tiny": {"name": "tiny", "args": TINY_ARGS, "alphas": [0.0, 0.1, 0.25, 0.5],
             "learning_rates": [5e-5, 5e-4], "seeds": [0, 1, 2], "variants": {"": []}},
}
# set by the grid for each run; not allowed after ``--``
RUN_FLAGS = ("--alpha", "--learning_rate", "--seed", "--output_dir", "--compare", "--results_file")
SPEC_KEYS = {"name", "args", "alphas", "learning_rates", "seeds", "variants"}


# ---- the grid -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GridRun:
    """One run of the grid: a variant (extra training arguments, '' for none), alpha, learning rate, seed."""

    variant: str
    alpha: float
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        prefix = f"{self.variant}_" if self.variant else ""
        return f"{prefix}a{self.alpha:g}_lr{self.learning_rate:g}_s{self.seed}"

    @property
    def setting(self) -> tuple:
        """What the seeds of a row share."""
        return (self.variant, self.alpha, self.learning_rate)


def load_spec(grid: str) -> dict:
    """A built-in grid by name (``smollm2``, ``tiny``) or a JSON file with the keys of :data:`SPEC_KEYS`
    (``variants``: an object of name -> its extra training arguments, or -> ``{"args": [...]}`` with
    any of ``alphas``, ``learning_rates``, ``seeds`` in place of the grid's; ``{"": []}`` when absent)."""
    if grid in BUILT_IN:
        return check_spec(json.loads(json.dumps(BUILT_IN[grid])), grid)
    if not os.path.isfile(grid):
        raise ValueError(f"--grid: expected one of {', '.join(BUILT_IN)} or a JSON file, got {grid!r}")
    with open(grid, encoding="utf-8") as handle:
        spec = json.load(handle)
    return check_spec(spec, grid)


def check_spec(spec, source: str) -> dict:
    """``spec`` with its defaults, or a ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(spec).__name__}")
    spec = dict(spec)
    spec.setdefault("name", os.path.splitext(os.path.basename(source))[0])
    spec.setdefault("args", [])
    spec.setdefault("variants", {"": []})
    unknown = set(spec) - SPEC_KEYS
    missing = {"alphas", "learning_rates", "seeds"} - set(spec)
    if unknown or missing:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                         f"a grid has {sorted(SPEC_KEYS)}")
    for key in ("alphas", "learning_rates", "seeds"):
        if not isinstance(spec[key], list) or not spec[key]:
            raise ValueError(f"{source}: {key!r} must be a non-empty list")
    if not isinstance(spec["variants"], dict) or not spec["variants"]:
        raise ValueError(f"{source}: 'variants' must be an object of name -> list of training arguments")
    spec["variants"] = {name: check_variant(name, variant, source) for name, variant in spec["variants"].items()}
    check_passthrough(spec["args"] + [a for variant in spec["variants"].values() for a in variant["args"]])
    return spec


CELL_KEYS = {"alphas", "learning_rates", "seeds"}


def _is_cells(cells) -> bool:
    """Whether ``cells`` is an object of non-empty lists under keys among :data:`CELL_KEYS`."""
    return (isinstance(cells, dict) and not set(cells) - CELL_KEYS
            and all(isinstance(value, list) and value for value in cells.values()))


def check_variant(name: str, variant, source: str) -> dict:
    """A variant as ``{"args": [...], ...}`` (from a list of arguments or such an object). ``also``: a list
    of more cells for the same arguments (e.g. more seeds at one setting), each an object of
    :data:`CELL_KEYS` whose missing keys are the variant's."""
    if isinstance(variant, list):
        variant = {"args": variant}
    known = {"args", "also"} | CELL_KEYS
    if (not isinstance(variant, dict) or not isinstance(variant.get("args", []), list) or set(variant) - known
            or (name and not name.replace("-", "").replace("_", "").isalnum())
            or not _is_cells({key: variant[key] for key in CELL_KEYS & set(variant)})
            or not (isinstance(variant.get("also", []), list) and all(map(_is_cells, variant.get("also", []))))):
        raise ValueError(f"{source}: variant {name!r}: expected a name of letters, digits, - and _, and a list of "
                         f"training arguments or an object with keys among {sorted(known)} (non-empty lists; "
                         f"'also': a list of objects with keys among {sorted(CELL_KEYS)})")
    return {"args": [], **variant}


def check_passthrough(args: list[str]) -> None:
    for arg in args:
        if str(arg).split("=")[0] in RUN_FLAGS:
            raise ValueError(f"{arg}: the grid sets {', '.join(RUN_FLAGS)} for each run; give the values in the grid")


def grid_runs(spec: dict) -> list[GridRun]:
    """Every run of the grid, in the order ``run --next`` takes them: seed, variant, learning rate, alpha.

    Seed-major across the variants too, so that a grid stopped part-way has already covered every
    setting, the variants' (the remedies') included, once.
    """
    runs = []
    for name, variant in spec["variants"].items():
        for cells in [{}, *variant.get("also", [])]:
            lists = [cells.get(key, variant.get(key, spec[key])) for key in ("seeds", "learning_rates", "alphas")]
            runs += [GridRun(name, float(alpha), float(lr), int(seed))
                     for seed, lr, alpha in itertools.product(*lists)]
    runs = list(dict.fromkeys(runs))  # a cell named twice is one run
    seeds = list(dict.fromkeys(run.seed for run in runs))  # in the order the grid names them
    return sorted(runs, key=lambda run: seeds.index(run.seed))


def run_argv(spec: dict, run: GridRun, run_dir: str, extra: list[str]) -> list[str]:
    """The training script's arguments for one run."""
    return [*map(str, spec["args"]), *map(str, spec["variants"][run.variant]["args"]), "--alpha", f"{run.alpha!r}",
            "--learning_rate", f"{run.learning_rate!r}", "--seed", str(run.seed), "--output_dir", run_dir,
            "--eval_pretrained", "false", *extra]


# ---- the output directory -----------------------------------------------------------------------

def metrics_path(directory: str, run: GridRun) -> str:
    return os.path.join(directory, run.name, "metrics.json")


def finished_metrics(directory: str, run: GridRun) -> dict | None:
    """The run's metrics.json when it is complete (a trained run with its evaluation), else None."""
    try:
        with open(metrics_path(directory, run), encoding="utf-8") as handle:
            metrics = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not metrics.get("run", {}).get("trained") or "eval" not in metrics:
        return None
    return metrics


def recorded_grid(directory: str) -> dict | None:
    path = os.path.join(directory, "grid.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    record["grid"] = check_spec(record["grid"], path)
    return record


def fix_grid(directory: str, spec: dict, extra: list[str]) -> None:
    """Record the grid and its extra arguments in ``<dir>/grid.json``. A grid may grow (more values,
    variants), but every finished run must stay in it with the same training arguments: refused otherwise."""
    record = {"grid": spec, "extra_args": list(extra)}
    previous = recorded_grid(directory)
    if previous is not None and previous != record:
        new_runs = set(grid_runs(spec))
        for run in grid_runs(previous["grid"]):
            if finished_metrics(directory, run) is None:
                continue
            run_dir = os.path.join(directory, run.name)
            if run not in new_runs or (run_argv(previous["grid"], run, run_dir, previous["extra_args"])
                                       != run_argv(spec, run, run_dir, list(extra))):
                raise ValueError(f"{directory}: its finished run {run.name} is not in this grid with the same training "
                                 f"arguments (recorded: {previous}; got: {record}). Use another --dir, or the same "
                                 "grid and arguments after --")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "grid.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def spec_of(directory: str, grid: str | None) -> tuple[dict, list[str]]:
    """The grid of ``--grid`` or, without it, the one recorded in ``directory``, with its extra arguments."""
    recorded = recorded_grid(directory)
    if grid is not None:
        return load_spec(grid), (recorded or {}).get("extra_args", [])
    if recorded is None:
        raise ValueError(f"{directory}: no grid.json yet; give --grid")
    return recorded["grid"], recorded["extra_args"]


def run_one(directory: str, spec: dict, run: GridRun, extra: list[str]) -> dict:
    """Train one run from the start (what an interrupted attempt left is removed first); its metrics."""
    from . import train

    run_dir = os.path.join(directory, run.name)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    print(f"grid {spec['name']}: {run.name}", flush=True)
    train.main(run_argv(spec, run, run_dir, extra))
    metrics = finished_metrics(directory, run)
    if metrics is None:
        raise RuntimeError(f"{run_dir}: the training script finished without a complete metrics.json")
    return metrics


def missing_runs(directory: str, spec: dict) -> list[GridRun]:
    return [run for run in grid_runs(spec) if finished_metrics(directory, run) is None]


def lock_path(directory: str, run: GridRun) -> str:
    return os.path.join(directory, f"{run.name}.lock")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock_owner(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return int(handle.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def claim(directory: str, run: GridRun) -> bool:
    """Take the run's lock for this process; False when a live process holds it. A lock left by a
    process that is gone (killed midway) is taken over."""
    path = lock_path(directory, run)
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and (owner == os.getpid() or _process_alive(owner)):
                return owner == os.getpid()
            try:  # stale: its process is gone
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def release(directory: str, run: GridRun) -> None:
    if _lock_owner(lock_path(directory, run)) == os.getpid():
        os.remove(lock_path(directory, run))


def claim_next(directory: str, missing: list[GridRun]) -> GridRun | None:
    """The first of ``missing`` this process could claim and that is still unfinished once claimed
    (another process may have finished it since ``missing`` was listed), or None."""
    for run in missing:
        if claim(directory, run):
            if finished_metrics(directory, run) is None:
                return run
            release(directory, run)
    return None


def claimed_by_other(directory: str, run: GridRun) -> bool:
    owner = _lock_owner(lock_path(directory, run))
    return owner is not None and owner != os.getpid() and _process_alive(owner)


def status_text(directory: str, spec: dict) -> str:
    runs = grid_runs(spec)
    done = [run for run in runs if finished_metrics(directory, run) is not None]
    lines = [f"grid {spec['name']} in {directory}: {len(done)} of {len(runs)} runs done"]
    lines += [f"  {'done   ' if run in done else 'running' if claimed_by_other(directory, run) else 'missing'} "
              f"{run.name}" for run in runs]
    return "\n".join(lines)


# ---- the aggregated results ---------------------------------------------------------------------

# (key in the JSON, where in metrics.json)
RUN_VALUES = {
    "val_ppl": ("eval", "eval_perplexity"),
    "test_ppl": ("test", "test_perplexity"),
    "val_acc": ("eval", "eval_token_acc"),
    "test_acc": ("test", "test_token_acc"),
    "val_cos": ("eval", "eval_cos_sim"),
    "test_cos": ("test", "test_cos_sim"),
}
GEOMETRY_VALUES = [(f"{group}_{measure}_{when}", when, group, key)
                   for group in ("seen", "unseen")
                   for measure, key in (("cos", "mean_pairwise_cosine"), ("erank", "effective_rank"))
                   for when in ("before", "after")] + \
                  [(f"{group}_change", "after", group, "relative_change") for group in ("seen", "unseen")]


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def run_record(run: GridRun, metrics: dict) -> dict:
    """The numbers of one run that the table and the plot use, read from its metrics.json."""
    values = {key: _number(metrics.get(section, {}).get(name)) for key, (section, name) in RUN_VALUES.items()}
    geometry = metrics.get("geometry", {})
    for key, when, group, name in GEOMETRY_VALUES:
        values[key] = _number(geometry.get(when, {}).get(group, {}).get(name))
    return {"name": run.name, "variant": run.variant, "alpha": run.alpha, "learning_rate": run.learning_rate,
            "seed": run.seed, "steps": metrics["train"].get("global_step"),
            "sample_size": geometry.get("sample_size"),
            "tokens": {group: geometry.get("before", {}).get(group, {}).get("tokens") for group in ("seen", "unseen")},
            "grad_norms": metrics.get("grad_norms", []), "values": values}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (NaN for one value), min and max of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": len(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else math.nan, "min": min(finite), "max": max(finite)}


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (variant, alpha, learning rate): the spread over its seeds of every value."""
    rows = {}
    for record in records:
        rows.setdefault((record["variant"], record["alpha"], record["learning_rate"]), []).append(record)
    out = []
    for (variant, alpha, lr), group in rows.items():
        keys = list(group[0]["values"])
        out.append({"variant": variant, "alpha": alpha, "learning_rate": lr, "seeds": [r["seed"] for r in group],
                    "steps": sorted({r["steps"] for r in group}),
                    "values": {key: spread([r["values"][key] for r in group]) for key in keys},
                    "grad_norms": mean_grad_norms(group)})
    return out


# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
# (key, how a run differs from its baseline: "relative" in %, or "absolute"; the page's column and format)
PAIRED = [("val_ppl", "relative", "val ppl", ".2f"), ("test_ppl", "relative", "test ppl", ".2f"),
          ("val_acc", "absolute", "val acc", ".4f"), ("test_acc", "absolute", "test acc", ".4f"),
          ("val_cos", "absolute", "val cos", ".4f")]


def paired_spread(differences: list[float]) -> dict:
    """:func:`spread` of per-seed differences, with the 95 % half-width of a paired t interval and whether
    it excludes 0 (``significant``; never with fewer than two seeds)."""
    stats = spread(differences)
    n = stats["n"]
    if n < 2:
        return dict(stats, half_width=math.nan, significant=False)
    quantile = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    half = quantile * stats["std"] / math.sqrt(n)
    return dict(stats, half_width=half, significant=abs(stats["mean"]) > half)


def perplexity_reading(deltas: dict) -> str:
    """One word for a setting against its baseline, from the two perplexities' paired intervals."""
    perplexities = [deltas[key] for key in ("val_ppl", "test_ppl")]
    if max(d["n"] for d in perplexities) < 2:
        return "one seed"
    signs = {math.copysign(1.0, d["mean"]) for d in perplexities if d["significant"]}
    return {frozenset(): "inconclusive", frozenset({1.0}): "worse", frozenset({-1.0}): "better"}.get(
        frozenset(signs), "mixed")


def paired_differences(records: list[dict]) -> list[dict]:
    """One row per setting other than a baseline: each seed's difference from the baseline run (no variant,
    alpha 0) of the same learning rate and seed, over the seeds both have; how many of those seeds have the
    higher perplexity; and :func:`perplexity_reading`."""
    baselines = {(r["learning_rate"], r["seed"]): r for r in records if not r["variant"] and r["alpha"] == 0}
    pairs = {}
    for record in records:
        base = baselines.get((record["learning_rate"], record["seed"]))
        if base is not None and base is not record:
            pairs.setdefault((record["variant"], record["alpha"], record["learning_rate"]), []).append((record, base))
    out = []
    for (variant, alpha, lr), group in pairs.items():
        deltas = {}
        for key, kind, _, _ in PAIRED:
            deltas[key] = paired_spread([
                100.0 * (run["values"][key] / base["values"][key] - 1.0) if kind == "relative"
                else run["values"][key] - base["values"][key] for run, base in group])
        higher = {key: sum(run["values"][key] > base["values"][key] for run, base in group)
                  for key in ("val_ppl", "test_ppl")}
        out.append({"variant": variant, "alpha": alpha, "learning_rate": lr,
                    "seeds": [run["seed"] for run, _ in group], "deltas": deltas, "higher_perplexity": higher,
                    "reading": perplexity_reading(deltas)})
    return out


def mean_grad_norms(records: list[dict]) -> list[dict]:
    """``{step, ce, cos}``: the mean over the runs of grad_norm_ce / grad_norm_cos at each step they all logged."""
    series = [{p["step"]: p for p in record["grad_norms"]} for record in records]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return [{"step": step, "ce": statistics.fmean(s[step]["grad_norm_ce"] for s in series),
             "cos": statistics.fmean(s[step]["grad_norm_cos"] for s in series)} for step in steps]


def collect(directory: str, spec: dict, extra: list[str]) -> dict:
    """The assembled results: the grid, every finished run's numbers and the rows aggregated over seeds."""
    finished = [(run, finished_metrics(directory, run)) for run in grid_runs(spec)]
    finished = [(run, metrics) for run, metrics in finished if metrics is not None]
    if not finished:
        raise ValueError(f"{directory}: no finished run of grid {spec['name']!r}; run some first")
    records = [run_record(run, metrics) for run, metrics in finished]
    first = finished[0][1]
    return {"grid": spec, "extra_args": extra, "runs_total": len(grid_runs(spec)), "model": short_model(first),
            "data": first["run"]["data"], "runs": records, "rows": aggregate(records),
            "paired": paired_differences(records)}


def short_model(metrics: dict) -> str:
    """The run's model description, a file path cut to its name (the page names no machine's folders)."""
    name, _, rest = metrics["run"]["model"].partition(" (")
    return os.path.basename(name) + (f" ({rest}" if rest else "")


# ---- the page -----------------------------------------------------------------------------------

def _cell(stats: dict, fmt: str) -> str:
    if not stats["n"]:
        return "-"
    text = f"{stats['mean']:{fmt}}"
    return text + (f" ± {stats['std']:{fmt}}" if math.isfinite(stats["std"]) else "")


def _setting(row: dict) -> list[str]:
    return [row["variant"] or "-", f"{row['alpha']:g}", f"{row['learning_rate']:g}", str(len(row["seeds"])),
            ", ".join(str(s) for s in row["steps"])]


def _table(head: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      *("| " + " | ".join(line) + " |" for line in lines)])


QUALITY = [("val ppl", "val_ppl", ".3f"), ("test ppl", "test_ppl", ".3f"), ("val acc", "val_acc", ".4f"),
           ("test acc", "test_acc", ".4f"), ("val cos", "val_cos", ".4f")]


def quality_table(results: dict) -> str:
    head = ["variant", "alpha", "lr", "seeds", "steps", *(label for label, _, _ in QUALITY)]
    return _table(head, [_setting(row) + [_cell(row["values"][key], fmt) for _, key, fmt in QUALITY]
                         for row in results["rows"]])


def _delta_cell(stats: dict, kind: str, fmt: str) -> str:
    if not stats["n"]:
        return "-"
    text = f"{stats['mean']:+{fmt}}" + (" %" if kind == "relative" else "")
    if math.isfinite(stats["half_width"]):
        text += f" ± {stats['half_width']:{fmt}}" + (" *" if stats["significant"] else "")
    return text


def paired_table(results: dict) -> str:
    head = ["variant", "alpha", "lr", "seeds", *(label for _, _, label, _ in PAIRED), "seeds with higher ppl",
            "perplexity"]
    lines = [[row["variant"] or "-", f"{row['alpha']:g}", f"{row['learning_rate']:g}", str(len(row["seeds"])),
              *(_delta_cell(row["deltas"][key], kind, fmt) for key, kind, _, fmt in PAIRED),
              ", ".join(f"{row['higher_perplexity'][key]}/{len(row['seeds'])} {split}"
                        for key, split in (("val_ppl", "val"), ("test_ppl", "test"))),
              row["reading"]] for row in results.get("paired", [])]
    return _table(head, lines)


def paired_section(results: dict) -> list[str]:
    """The page's lines comparing each setting with the same seed's baseline (none without such pairs)."""
    if not results.get("paired"):
        return []
    return ["## Against the baseline of the same seed", "",
            "The seed (the order of the training data; a new model's initialisation) can move the result as "
            "much as a small alpha does; comparing each run with the baseline of its own seed (alpha 0, same "
            "learning rate) takes that out. Each cell: the mean over the seeds of the run's difference from "
            "its baseline (perplexity in % of the baseline's, accuracy and cos in absolute terms) ± the "
            "half-width of the paired 95 % t interval; `*`: the interval excludes 0; then how many of the seeds "
            "have a higher perplexity than their baseline. The last column reads the two perplexities: worse or "
            "better where an interval excludes 0 (mixed where the two disagree), inconclusive where neither "
            "does: the seeds' spread is too wide for their number.",
            "", paired_table(results), ""]


def geometry_table(results: dict) -> str:
    head = ["variant", "alpha", "lr", "seeds", "steps", "seen cos before → after", "unseen cos before → after",
            "seen erank before → after", "unseen erank before → after", "seen change", "unseen change"]
    lines = []
    for row in results["rows"]:
        v = row["values"]
        cells = [f"{_cell(v[f'{group}_{measure}_before'], fmt)} → {_cell(v[f'{group}_{measure}_after'], fmt)}"
                 for measure, fmt in (("cos", ".4f"), ("erank", ".1f")) for group in ("seen", "unseen")]
        lines.append(_setting(row) + cells + [_cell(v["seen_change"], ".2e"), _cell(v["unseen_change"], ".2e")])
    return _table(head, lines)


def command_text(results: dict) -> str:
    name = results["grid"]["name"]
    built_in = name in BUILT_IN and check_spec(BUILT_IN[name], name) == results["grid"]
    grid, note = (name, "") if built_in else ("GRID.json", f"   # GRID.json: the \"grid\" object of {name}.json")
    extra = " ".join(results["extra_args"])
    return (f"python -m fused_cosloss.grid run --grid {grid} --dir DIR --all -- {extra}{note}\n"
            f"python -m fused_cosloss.grid assemble --dir DIR --out docs/experiments.md")


def _cells_text(cells: dict) -> str:
    """`` at alpha {0, 0.5}, learning rate {0.0005}, seeds {3, 4}``: the keys ``cells`` has."""
    named = [(f"{label} {{{', '.join(f'{value:g}' for value in cells[key])}}}")
             for key, label in (("alphas", "alpha"), ("learning_rates", "learning rate"), ("seeds", "seeds"))
             if key in cells]
    return " at " + ", ".join(named) if named else ""


def variant_text(name: str, variant: dict) -> str:
    """How the page names a variant (nothing for the plain grid without ``also`` cells)."""
    text = f"; variant `{name}`: `{' '.join(map(str, variant['args']))}`{_cells_text(variant)}" if name else ""
    also = " and".join(_cells_text(cells) for cells in variant.get("also", []))
    if also:
        text += f" (also{also})" if name else f"; the grid also{also}"
    return text


def page_text(results: dict, plot_name: str | None) -> str:
    """The markdown page, from the assembled results alone."""
    grid = results["grid"]
    done = len(results["runs"])
    tokens = results["runs"][0]["tokens"]
    lines = [
        "# Experiment: the cosine term's effect on quality and on the embedding",
        "",
        f"<!-- generated by python -m fused_cosloss.grid assemble from {grid['name']}.json; do not edit -->",
        "",
        f"Model: {results['model']}. Data: {results['data']}. Grid `{grid['name']}`: alpha in "
        f"{{{', '.join(f'{a:g}' for a in grid['alphas'])}}} x learning rate in "
        f"{{{', '.join(f'{lr:g}' for lr in grid['learning_rates'])}}} x seeds {{{', '.join(map(str, grid['seeds']))}}}"
        + "".join(variant_text(name, v) for name, v in grid["variants"].items())
        + f"; training arguments `{' '.join(map(str, grid['args'] + results['extra_args']))}`.",
        "",
        f"Runs done: {done} of {results['runs_total']}"
        + (" (THE GRID IS INCOMPLETE: the rows below average the seeds that ran)" if done < results["runs_total"]
           else "") + ".",
        "",
        "Each cell is the mean ± the sample standard deviation over the seeds (the JSON has min, max and every "
        "run). Reproduce (one run per `run --next`, resumable; `--all` loops):",
        "",
        "```",
        command_text(results),
        "```",
        "",
        "## Quality (validation and test)",
        "",
        quality_table(results),
        "",
        *paired_section(results),
        "## The embedding (the cosine term's table)",
        "",
        f"Over a fixed sample (at most {results['runs'][0].get('sample_size', 2048)} rows, the same before and "
        f"after) of the tokens seen in the training split ({tokens['seen']}) and of the rest ({tokens['unseen']}): "
        "mean pairwise cosine (1: one direction), effective rank, and the relative change "
        "|after - before| / |before| of the rows (fused_cosloss.geometry).",
        "",
        geometry_table(results),
        "",
    ]
    if plot_name:
        lines += [f"![the grid]({plot_name})", ""]
    return "\n".join(lines)


# ---- the plot -----------------------------------------------------------------------------------

# (panel title, [(value key, line style)], log axis where the values span a decade); solid: seen tokens,
# dashed: unseen
PLOT_PANELS = [("validation perplexity", [("val_ppl", "-")], True),
               ("validation token accuracy", [("val_acc", "-")], False),
               ("validation eval_cos_sim", [("val_cos", "-")], False),
               ("mean pairwise cos after (seen -, unseen --; before ...)",
                [("seen_cos_after", "-"), ("unseen_cos_after", "--")], False),
               ("relative change of the rows (seen -, unseen --)",
                [("seen_change", "-"), ("unseen_change", "--")], True)]


def _lines(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """``rows`` (of the table or of the paired comparison) by (variant, learning rate), each sorted by alpha."""
    lines = {}
    for row in rows:
        lines.setdefault((row["variant"], row["learning_rate"]), []).append(row)
    return [(key, sorted(rows, key=lambda r: r["alpha"])) for key, rows in sorted(lines.items())]


def _label(variant: str, lr: float) -> str:
    return (f"{variant} " if variant else "") + f"lr={lr:g}"


def _value_panel(ax, results: dict, title: str, series: list, log: bool) -> None:
    """Values against alpha, one colour per (variant, learning rate), error bars over the seeds."""
    for index, ((variant, lr), rows) in enumerate(_lines(results["rows"])):
        for key, style in series:
            stats = [r["values"][key] for r in rows]
            ax.errorbar([r["alpha"] for r in rows], [s["mean"] for s in stats], linestyle=style, capsize=3,
                        yerr=[s["std"] if math.isfinite(s["std"]) else 0.0 for s in stats], color=f"C{index}",
                        marker="os^Dv"[index % 5], label=_label(variant, lr) if style == "-" else None)
    if series[0][0].endswith("_cos_after"):
        for key, style in series:
            before = statistics.fmean(r["values"][key.replace("after", "before")]["mean"] for r in results["rows"])
            if math.isfinite(before):
                ax.axhline(before, color="gray", linestyle=":", linewidth=1)
    means = [r["values"][key]["mean"] for r in results["rows"] for key, _ in series]
    if log and all(m > 0 for m in means) and max(means) > 10 * min(means):  # a narrower range reads better linear
        ax.set_yscale("log")
        title += " (log scale)"
    ax.set_xlabel("alpha")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")


def _paired_panel(ax, results: dict) -> None:
    """The perplexities' paired difference from the same seed's baseline against alpha (the baseline: 0 at
    alpha 0), error bars the 95 % interval's half-width."""
    keys = [key for key, _ in _lines(results["rows"])]  # the colours of the other panels
    for (variant, lr), rows in _lines(results.get("paired", [])):
        index = keys.index((variant, lr))
        for key, style in (("val_ppl", "-"), ("test_ppl", "--")):
            stats = [r["deltas"][key] for r in rows]
            alphas = [r["alpha"] for r in rows]
            means = [s["mean"] for s in stats]
            errors = [s["half_width"] if math.isfinite(s["half_width"]) else 0.0 for s in stats]
            if not variant:  # the baseline itself differs by 0
                alphas, means, errors = [0.0, *alphas], [0.0, *means], [0.0, *errors]
            ax.errorbar(alphas, means, yerr=errors, linestyle=style, capsize=3, color=f"C{index}",
                        marker="os^Dv"[index % 5])
    ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("alpha")
    ax.set_ylabel("% of the baseline's perplexity")
    ax.set_title("perplexity vs the same seed's baseline (val -, test --; 95 % interval)", fontsize=9)
    ax.grid(alpha=0.3, which="both")


def _grad_norm_panel(ax, results: dict) -> None:
    """grad_norm_cos / grad_norm_ce over the training steps, mean over seeds, one line per setting with alpha > 0."""
    for index, row in enumerate(r for r in results["rows"] if r["alpha"] > 0):
        points = [(p["step"], p["cos"] / p["ce"]) for p in row["grad_norms"] if p["ce"] > 0]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{index % 10}",
                    linestyle=["-", "--", ":", "-."][(index // 10) % 4],
                    label=f"{_label(row['variant'], row['learning_rate'])} a={row['alpha']:g}")
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("grad norm of alpha·cos / of (1-alpha)·CE (log)", fontsize=9)
    ax.grid(alpha=0.3, which="both")


def plot(results: dict, path: str) -> str | None:
    """The values against alpha and the gradient norms over training (:data:`PLOT_PANELS`); None without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    _paired_panel(axes.flat[0], results)
    for ax, (title, series, log) in zip(axes.flat[1:], PLOT_PANELS):
        _value_panel(ax, results, title, series, log)
    _grad_norm_panel(axes.flat[6], results)
    legend = axes.flat[7]
    legend.axis("off")
    legend.legend(*axes.flat[1].get_legend_handles_labels(), loc="center", title="colour: the setting")
    fig.suptitle(f"grid {results['grid']['name']}: mean over seeds, error bars their standard deviation "
                 "(first panel: the paired 95 % interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the files ----------------------------------------------------------------------------------

def result_paths(out: str, name: str, json_path: str | None = None) -> tuple[str, str]:
    """The JSON and the plot beside the page: ``<page dir>/results/experiments/<grid>.json`` / ``.png``."""
    json_path = json_path or os.path.join(os.path.dirname(os.path.abspath(out)), "results", "experiments",
                                          f"{name}.json")
    return json_path, os.path.splitext(json_path)[0] + ".png"


def _relative(path: str, start_file: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(start_file)))


def write_assembled(results: dict, out: str, json_path: str) -> list[str]:
    """The JSON, the plot and the page; the paths written."""
    _, png = result_paths(out, results["grid"]["name"], json_path)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    written = [json_path]
    if plot(results, png):
        written.append(png)
    page = page_text(results, _relative(png, out) if png in written else None)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(page)
    return [out, *written]


def check_page(out: str, json_path: str) -> bool:
    """Whether the page is what its JSON gives."""
    with open(json_path, encoding="utf-8") as handle:
        results = json.load(handle)
    _, png = result_paths(out, results["grid"]["name"], json_path)
    expected = page_text(results, _relative(png, out) if os.path.exists(png) else None)
    with open(out, encoding="utf-8") as handle:
        return handle.read() == expected


# ---- the command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_cosloss.grid", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every run of the training script.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the next missing run (--next) or all of them (--all)")
    status = commands.add_parser("status", help="list the runs done and missing")
    assemble = commands.add_parser("assemble", help="write the JSON, the page and the plot from the runs")
    for command in (run, status, assemble):
        command.add_argument("--grid", help=f"a built-in grid ({', '.join(BUILT_IN)}) or a JSON file "
                                            "(default: the one recorded in --dir)")
        command.add_argument("--dir", help="the grid's output directory (one folder per run)")
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("--next", action="store_true", help="the first run without a finished metrics.json")
    which.add_argument("--all", action="store_true", help="every missing run, one after the other")
    run.add_argument("--stop_after", type=float, default=None, metavar="SECONDS",
                     help="with --all: start no new run once this many seconds have passed (a piece of the grid "
                          "then lasts SECONDS plus at most one run)")
    assemble.add_argument("--out", required=True, help="the markdown page (e.g. docs/experiments.md)")
    assemble.add_argument("--json", help="the aggregated JSON (default: <page dir>/results/experiments/<grid>.json)")
    assemble.add_argument("--check", action="store_true",
                          help="only check that the page is what its JSON gives (exit 1 when not); needs no --dir")
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def main(argv=None) -> int:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(own)
    try:
        return _command(args, extra)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _command(args, extra: list[str]) -> int:
    if args.command == "assemble" and args.check:
        json_path = args.json or _json_of_page(args.out)
        if check_page(args.out, json_path):
            print(f"{args.out}: up to date with {json_path}")
            return 0
        print(f"{args.out}: differs from what {json_path} gives; run python -m fused_cosloss.grid assemble")
        return 1
    if not args.dir:
        raise ValueError(f"{args.command}: give --dir")
    if args.command != "run" and extra:
        raise ValueError(f"{args.command}: arguments after -- are for run; got {extra}")
    if args.command == "run":
        check_passthrough(extra)
        if args.grid is None and not extra:  # resuming: the grid and the arguments recorded in --dir
            spec, extra = spec_of(args.dir, None)
        else:
            spec = load_spec(args.grid) if args.grid else spec_of(args.dir, None)[0]
        fix_grid(args.dir, spec, extra)
        if args.stop_after is not None and not (args.all and args.stop_after >= 0):
            raise ValueError(f"--stop_after: expected seconds >= 0 with --all, got {args.stop_after}")
        started = time.monotonic()
        while True:
            missing = missing_runs(args.dir, spec)
            if not missing:
                print(f"grid {spec['name']}: every run is done")
                return 0
            run = claim_next(args.dir, missing)
            if run is None:
                print(f"grid {spec['name']}: the {len(missing)} missing run(s) are being trained by other processes")
                return 0
            try:
                run_one(args.dir, spec, run, extra)
            finally:
                release(args.dir, run)
            if args.next or (args.stop_after is not None and time.monotonic() - started >= args.stop_after):
                print(f"grid {spec['name']}: {len(missing) - 1} run(s) left")
                return 0
    spec, recorded_extra = spec_of(args.dir, args.grid)
    if args.command == "status":
        print(status_text(args.dir, spec))
        return 0
    results = collect(args.dir, spec, recorded_extra)
    json_path, _ = result_paths(args.out, spec["name"], args.json)
    for path in write_assembled(results, args.out, json_path):
        print(f"wrote {path}")
    return 0


def _json_of_page(out: str) -> str:
    """The JSON a generated page names in its first lines."""
    with open(out, encoding="utf-8") as handle:
        head = handle.read(2000)
    marker = "assemble from "
    if marker not in head:
        raise ValueError(f"{out}: not a page written by python -m fused_cosloss.grid assemble; give --json")
    name = head.split(marker, 1)[1].split(";", 1)[0].strip()
    return os.path.join(os.path.dirname(os.path.abspath(out)), "results", "experiments", name)


if __name__ == "__main__":
    sys.exit(main())
