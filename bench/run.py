"""Speed and memory of every implementation of the loss, side by side.

    python bench/run.py --vocab 50257                  # CPU: ~3 minutes on 2 cores
    python bench/run.py --device cuda                  # GPU sweep 4096..32768, bfloat16
    python bench/run.py --impl seed-style,native --tokens 512 --mode fwd+bwd
    python bench/run.py --impl native --softcap 30 --z-loss 1e-4   # each option's cost next to the plain rows

Every implementation (bench/impls.py) first runs on the benchmark's own inputs and is
compared with the reference, loss and gradients; a WRONG one is not timed. Each runs in
its own process (bench/worker.py). The floor (copy bandwidth; on CPU also exp throughput)
is measured in the same run. Results: a table on stdout, and ``<slug>.json``, ``.png``,
``.md`` in ``--out-dir`` (bench/results/, one set per machine, e.g. cpu-2core) unless
``--no-save``; ``--json``/``--plot``/``--markdown`` put single files elsewhere.

With loss options (``--logit-scale``, ``--softcap``, ``--label-smoothing``, ``--z-loss``) every
implementation of the package runs twice, plain and with the options: the options row (its
``options`` and ``label``, e.g. ``native +softcap=30,z_loss=1e-4``) is checked against the
reference with the same options and reports ``vs_plain``, its median over the plain row's. The
implementations from elsewhere (seed-style, Liger, CCE, torch) take no options: plain rows only.
Such a run saves ``options-<options>-<slug>.*`` (e.g. options-softcap30-zloss1e-4-cpu-2core).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.impls import IMPLS, OPTION_NAMES, select  # noqa: E402
from bench.measure import floor_ms  # noqa: E402

DEFAULTS = {
    # CPU: small enough that the whole default run, torch.compile included, stays under 3 minutes on 2 cores
    "cpu": {"tokens": "128,512", "dtype": "float32", "repeats": 5, "warmup": 1},
    "cuda": {"tokens": "4096,8192,16384,32768", "dtype": "bfloat16", "repeats": 20, "warmup": 3},
}
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50257, help="V (default 50257, GPT-2)")
    parser.add_argument("--hidden", type=int, default=768, help="H (default 768)")
    parser.add_argument("--topk", type=str, default="256", help="K, or 'none' for the whole vocabulary (default 256)")
    parser.add_argument("--tokens", type=str, default=None,
                        help=f"comma-separated N sweep (CPU default {DEFAULTS['cpu']['tokens']}, "
                             f"GPU {DEFAULTS['cuda']['tokens']})")
    parser.add_argument("--dtype", choices=sorted(ELEM_BYTES), default=None,
                        help="CPU default float32, GPU bfloat16")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--impl", type=str, default=None, help=f"comma-separated subset of: {', '.join(IMPLS)}")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both")
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of the mixed rows (the ce-* rows use 0)")
    parser.add_argument("--temperature", type=float, default=1.0)
    options = parser.add_argument_group(
        "loss options", "any of these adds, for each implementation of the package, a row with the options beside "
                        "its plain row (the others run plain only)")
    options.add_argument("--logit-scale", type=float, default=None, metavar="S", help="logit_scale s > 0")
    options.add_argument("--softcap", type=float, default=None, metavar="C", help="softcap c > 0 (c * tanh(x / c))")
    options.add_argument("--label-smoothing", type=float, default=0.0, metavar="E", help="label_smoothing in [0, 1]")
    options.add_argument("--z-loss", type=float, default=0.0, metavar="Z", help="z_loss >= 0 (Z * lse ** 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per mode (CPU 5, GPU 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forward+backward calls first (CPU 1, GPU 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per implementation")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--no-save", action="store_true", help="write nothing but the explicit --json/--plot/--markdown")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH")
    parser.add_argument("--plot", dest="plot_path", default=None, metavar="PATH")
    parser.add_argument("--markdown", dest="markdown_path", default=None, metavar="PATH")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    defaults = DEFAULTS[args.device]
    args.tokens = [int(n) for n in (args.tokens or defaults["tokens"]).split(",") if n.strip()]
    args.dtype = args.dtype or defaults["dtype"]
    args.repeats = args.repeats or defaults["repeats"]
    args.warmup = defaults["warmup"] if args.warmup is None else args.warmup
    args.topk = None if args.topk.lower() in ("none", "0", "all") else int(args.topk)
    args.modes = ["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode]
    try:
        args.impls = [impl.name for impl in select(args.impl.split(",") if args.impl else None, args.device)]
    except ValueError as error:
        parser.error(str(error))
    if any(n < 1 for n in args.tokens) or args.repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0:
        parser.error("--alpha must be in [0, 1] and --temperature > 0")
    try:
        args.options = loss_options(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def loss_options(args: argparse.Namespace) -> dict:
    """The loss options turned on by the flags, as mixed_loss's keyword arguments (in the spec's order);
    {} when none is."""
    positive = {"logit_scale": args.logit_scale, "softcap": args.softcap}
    for name, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0 (got {value})")
    if not 0.0 <= args.label_smoothing <= 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1] (got {args.label_smoothing})")
    if not (math.isfinite(args.z_loss) and args.z_loss >= 0.0):
        raise ValueError(f"--z-loss must be a finite number >= 0 (got {args.z_loss})")
    values = {**positive, "label_smoothing": args.label_smoothing, "z_loss": args.z_loss}
    off = {"logit_scale": None, "softcap": None, "label_smoothing": 0.0, "z_loss": 0.0}
    return {name: float(values[name]) for name in OPTION_NAMES if values[name] != off[name]}


# --------------------------------------------------------------------------- workers

class Progress:
    """A tqdm bar on stderr (a plain counter when tqdm is missing or --no-progress)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:48])

    def step(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_worker(task: str, conf: dict, timeout: float, on_event) -> dict:
    """Run bench/worker.py in a fresh interpreter; its JSON result, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="fused_cosloss_bench_") as tmp:
        out_path = os.path.join(tmp, "out.json")
        err_path = os.path.join(tmp, "stderr.txt")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bench.worker", task, json.dumps(conf), out_path],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            killed = []
            timer = threading.Timer(timeout, lambda: (killed.append(True), proc.kill()))
            timer.start()
            try:
                for line in proc.stdout:
                    if line.startswith("@@"):
                        try:
                            on_event(json.loads(line[2:]))
                        except ValueError:
                            pass
                code = proc.wait()
            finally:
                timer.cancel()
        partial = {}
        if os.path.exists(out_path):
            with open(out_path) as out:
                partial = json.load(out)
        if code == 0 and partial:
            return partial
        with open(err_path) as err:
            tail = err.read()[-3000:]
        if killed:
            why = f"killed after the {timeout:.0f} s --timeout"
        elif code == -9:
            why = "worker killed (SIGKILL: most likely out of memory)"
        else:
            why = f"worker exited with {code}"
        return {**partial, "error": why, "stderr_tail": tail}


# --------------------------------------------------------------------------- assembling the result

def variants(args, impl) -> list[dict]:
    """The loss options of each run of ``impl``: {} (plain), then the options if any and it takes them."""
    return [{}] + ([args.options] if args.options and impl.takes_options else [])


def worker_conf(args, **extra) -> dict:
    conf = {"device": args.device, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden,
            "topk": args.topk, "alpha": args.alpha, "temperature": args.temperature, "tokens": args.tokens,
            "modes": args.modes, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
            "threads": args.threads, "memory": not args.no_memory}
    conf.update(extra)
    return conf


def add_derived(result: dict, args) -> None:
    """Floors per shape, time over the floor, and speedups against each group's baseline."""
    floor = result["floor"]
    device = result["machine"]["device"]
    floor["per_point"] = [
        {"n_tokens": n, "mode": mode,
         "floor_ms": floor_ms(device, mode, n, args.vocab, ELEM_BYTES[args.dtype], floor["copy_bytes_per_s"],
                              floor.get("exp_elems_per_s"))}
        for n in args.tokens for mode in args.modes
    ]
    floors = {(p["n_tokens"], p["mode"]): p["floor_ms"] for p in floor["per_point"]}
    baselines, plain = {}, {}
    for row in result["results"]:
        if row["status"] == "ok" and not row.get("options"):
            for mode, stats in row["modes"].items():
                plain[(row["impl"], row["n_tokens"], mode)] = stats["median_ms"]
                if IMPLS[row["impl"]].baseline:
                    baselines[(row["group"], row["n_tokens"], mode)] = (row["impl"], stats["median_ms"])
    for row in result["results"]:
        for mode, stats in (row.get("modes") or {}).items():
            if IMPLS[row["impl"]].has_floor:
                stats["floor_ms"] = floors[(row["n_tokens"], mode)]
                stats["over_floor"] = stats["median_ms"] / stats["floor_ms"]
            if row.get("options"):
                # against the same implementation without the options; the baselines compute another loss
                plain_ms = plain.get((row["impl"], row["n_tokens"], mode))
                if plain_ms is not None:
                    stats["vs_plain"] = stats["median_ms"] / plain_ms
                continue
            base = baselines.get((row["group"], row["n_tokens"], mode))
            if base is not None:
                stats["speedup_vs"] = base[0]
                stats["speedup"] = base[1] / stats["median_ms"]


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def stem(machine: dict, options: dict) -> str:
    """The result files' name: the machine's slug, after the options for an options run."""
    if not options:
        return slug(machine)
    what = "-".join(f"{name.replace('_', '')}{report.short_number(value)}" for name, value in options.items())
    return f"options-{what}-{slug(machine)}"


def slug(machine: dict) -> str:
    if machine["device"] == "cpu":
        return f"cpu-{machine.get('cpu_affinity') or machine['cpu_count']}core"
    name = re.sub(r"[^a-z0-9]+", "-", machine["device_name"].lower()).strip("-")
    return f"cuda-{name}"


def assemble(args, argv, probe, results, unavailable, about, started, load_before, partial=False) -> dict:
    """The result document (what --json writes); ``partial``: some implementations have not run yet."""
    results = sorted(results, key=lambda row: (row["n_tokens"], args.impls.index(row["impl"]),
                                                bool(row.get("options"))))
    result = {
        "meta": {
            "command": shlex.join(["python", "bench/run.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(),
            "load_before": load_before,
            "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "wall_s": None,
            "probe_s": probe["probe_s"],
            "cpu_peak_memory_unavailable": probe.get("cpu_peak_memory"),
            "partial": partial,
        },
        "machine": probe["machine"],
        "config": {"device": args.device, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden,
                   "topk": args.topk, "alpha": args.alpha, "temperature": args.temperature, "tokens": args.tokens,
                   "modes": args.modes, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                   **({"options": dict(args.options)} if args.options else {})},
        "floor": copy.deepcopy(probe["floor"]),
        "impls": copy.deepcopy(about),
        "unavailable": dict(unavailable),
        "results": copy.deepcopy(results),
    }
    add_derived(result, args)
    result["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = sum(len(variants(args, IMPLS[name])) for name in args.impls)
    progress = Progress(1 + runs * len(args.tokens), not args.no_progress)

    progress.describe("probe: machine, floor")
    probe_started = time.perf_counter()
    probe = run_worker("probe", worker_conf(args, impls=args.impls), args.timeout, lambda event: None)
    probe["probe_s"] = round(time.perf_counter() - probe_started, 1)
    progress.step()
    if "error" in probe:
        progress.close()
        print(f"the probe failed: {probe['error']}\n{probe['stderr_tail']}", file=sys.stderr)
        return 1

    results, unavailable, about = [], {}, {}
    for name in args.impls:
        impl = IMPLS[name]
        about[name] = {"group": impl.group, "about": impl.about, "kind": impl.kind,
                       "alpha": impl.alpha_value(args.alpha)}
        reason = probe["availability"].get(name)
        if reason is not None:
            unavailable[name] = reason
            progress.step(len(args.tokens) * len(variants(args, impl)))
            continue
        for options in variants(args, impl):
            # the options row right after the plain one: the two are timed minutes apart at most
            label = report.options_label(name, options) if options else name
            tags = {"label": label, "options": dict(options)} if options else {}
            conf = worker_conf(args, impl=name, cache_bytes=probe["machine"]["cache_bytes"],
                               cpu_peak_memory=probe["cpu_peak_memory"], **({"options": options} if options else {}))

            def on_event(event, label=label):
                if event.get("stage") == "done":
                    progress.step()
                else:
                    progress.describe(f"{label} N={event.get('n')} {event.get('stage')}")

            worker_started = time.perf_counter()
            out = run_worker("impl", conf, args.timeout, on_event)
            about[name]["options_worker_s" if options else "worker_s"] = round(time.perf_counter() - worker_started, 1)
            if out.get("unavailable"):
                unavailable[label] = out["unavailable"]
            points = out.get("points", [])
            done = {p["n_tokens"] for p in points}
            for n in args.tokens:
                if n not in done:   # the worker died before this point
                    points.append({"n_tokens": n, "status": "error", "reason": out.get("error", "no result"),
                                   "stderr_tail": out.get("stderr_tail", "")[-1500:]})
            if out.get("unavailable") is None:
                for point in points:
                    results.append({"impl": name, "group": impl.group, "alpha": impl.alpha_value(args.alpha),
                                    **tags, **point})
            if "error" in out:
                progress.step(len(args.tokens) - len(done))
            if args.json_path:   # what has run so far, in case the run is stopped before the end
                partial = assemble(args, argv, probe, results, unavailable, about, started, load_before,
                                   partial=True)
                report.write_json(partial, args.json_path + ".tmp")
                os.replace(args.json_path + ".tmp", args.json_path)
    progress.close()
    result = assemble(args, argv, probe, results, unavailable, about, started, load_before)
    print(report.format_text(result))
    print(f"wall time: {result['meta']['wall_s']:.0f} s")
    paths = {"json": args.json_path, "plot": args.plot_path, "markdown": args.markdown_path}
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        base = os.path.join(args.out_dir, stem(result["machine"], args.options))
        for key, ext in (("json", ".json"), ("plot", ".png"), ("markdown", ".md")):
            paths[key] = paths[key] or base + ext
    if paths["json"]:
        report.write_json(result, paths["json"])
    if paths["markdown"]:
        with open(paths["markdown"], "w") as out:
            out.write(report.format_markdown(result))
    if paths["plot"]:
        try:
            report.write_plot(result, paths["plot"])
        except ImportError as error:
            print(f"no plot: {error} (pip install matplotlib)", file=sys.stderr)
            paths["plot"] = None
    written = [path for path in paths.values() if path]
    if written:
        print("wrote " + ", ".join(os.path.relpath(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
