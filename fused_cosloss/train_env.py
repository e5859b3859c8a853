"""What the training script records about where it ran: the process layout and the machine's load.

Two things that otherwise mislead silently:

- ``accelerate launch --cpu --num_processes 2`` starts *one* process (accelerate's ``--cpu``
  takes the simple launcher, whatever ``--num_processes`` says). :func:`world_layout`
  describes the layout the Trainer really has, and :func:`layout_text` says so at start.
- On a shared machine a time comparison can be off by a factor of two or more.
  :class:`LoadProbe` records the 1-minute load average before and after each run, takes
  out the part that is the script's own (the load average is an exponential average with a
  60 s time constant, so a run's own threads contribute ``threads * (1 - exp(-t / 60))``
  after ``t`` seconds, decaying by ``exp(-t / 60)`` once it has ended) and marks the run's
  time unreliable when the rest exceeded half the cores, the threshold of ``bench/run.py``.
"""
from __future__ import annotations

import math
import os
import time

LOAD_TIME_CONSTANT_S = 60.0  # the 1-minute load average
BUSY_SHARE_OF_CORES = 0.5  # as bench/report.py


def _launcher(env) -> str:
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if any(key.startswith("ACCELERATE_") for key in env):
        return "accelerate launch"
    return "python"


def world_layout(training_args, threads: int, env=None) -> dict:
    """The processes the Trainer runs on: world size, this process's ranks, processes per node,
    nodes, device, distributed backend, torch threads per process and the launcher."""
    env = os.environ if env is None else env
    world = int(training_args.world_size)
    local_world = int(env.get("LOCAL_WORLD_SIZE", world if world == 1 else 0)) or world
    backend = None
    if world > 1:
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else training_args.ddp_backend
    return {
        "world_size": world,
        "rank": int(training_args.process_index),
        "local_rank": int(training_args.local_process_index),
        "processes_per_node": local_world,
        "nodes": max(world // local_world, 1),
        "device": str(training_args.device),
        "distributed_backend": backend,
        "threads_per_process": int(threads),
        "launcher": _launcher(env),
        "accelerate_cpu": str(env.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes"),
    }


FSDP_NOT_ENABLED = (
    "--fsdp: accelerate did not enable FSDP for this run (on {device} it runs the processes as plain data "
    "parallel and ignores --fsdp), so the parameters would not be sharded; run it on CUDA devices (FSDP2: "
    "--fsdp full_shard --fsdp_config '{{\"version\": 2}}') or drop --fsdp. The loss itself takes FSDP2-sharded "
    "embeddings on any device: docs/vocab_parallel.md")


def parallel_layout(trainer) -> str:
    """How the Trainer's model is spread over its processes: "single process", "data parallel (DDP)",
    "FSDP1"/"FSDP2" (the parameters sharded) or "tensor parallel (N-way)" (a model loaded with a tp_plan).
    Raises ``ValueError`` when --fsdp was asked for and accelerate did not enable it (it would otherwise
    train as plain data parallel without a word)."""
    args, model = trainer.args, trainer.model
    tp_size = int(getattr(model, "tp_size", None) or 1)
    if tp_size > 1:
        return f"tensor parallel ({tp_size}-way)"
    if args.fsdp:
        if not getattr(trainer, "is_fsdp_enabled", False):
            raise ValueError(FSDP_NOT_ENABLED.format(device=args.device))
        return f"FSDP{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    return "data parallel (DDP)" if int(args.world_size) > 1 else "single process"


def layout_text(world: dict) -> str:
    """One line on the process layout, and a second when accelerate's ``--cpu`` kept it to one process."""
    processes = "1 process" if world["world_size"] == 1 else (
        f"{world['world_size']} processes ({world['processes_per_node']} per node on {world['nodes']} node(s), "
        f"{world['distributed_backend']})")
    text = (f"world: {processes} on {world['device']}, {world['threads_per_process']} torch thread(s) each, "
            f"started by {world['launcher']}")
    if world.get("parallel"):
        text += f"; layout: {world['parallel']}"
    if world["world_size"] == 1 and world["accelerate_cpu"]:
        text += ("\nnote: `accelerate launch --cpu` starts one process whatever --num_processes says; for N CPU "
                 "processes use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`")
    return text


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def own_load(threads: float, ran_s: float, since_end_s: float = 0.0) -> float:
    """The part of the 1-minute load average due to ``threads`` busy threads that ran for ``ran_s``
    seconds and stopped ``since_end_s`` seconds ago."""
    ran = max(ran_s, 0.0) / LOAD_TIME_CONSTANT_S
    since = max(since_end_s, 0.0) / LOAD_TIME_CONSTANT_S
    return threads * (1.0 - math.exp(-ran)) * math.exp(-since)


class LoadProbe:
    """Load averages around the runs of one script: :meth:`start` and :meth:`stop` around each run.

    ``threads`` is the number of threads the script keeps busy on this machine (torch threads
    times processes on the node). The record of each run has ``load_before``, ``load_after``,
    ``other_load_before``/``other_load_after`` (less the script's own estimated share), the
    ``cores`` and ``busy``: True when the other load exceeded half the cores, so that the run's
    time cannot be compared with another's.
    """

    def __init__(self, threads: int, cores: int | None = None, clock=time.monotonic, read=load_average):
        self.threads = threads
        self.cores = cores or usable_cores()
        self.clock = clock
        self.read = read
        self._previous = None  # (ran_s, ended_at) of the last run measured
        self._started = None

    def _residue(self, at: float) -> float:
        """What the previous run of this script still adds to the load average at time ``at``."""
        if self._previous is None:
            return 0.0
        ran_s, ended_at = self._previous
        return own_load(self.threads, ran_s, at - ended_at)

    def start(self) -> None:
        now = self.clock()
        self._started = (now, self.read(), self._residue(now))

    def stop(self) -> dict:
        started_at, before, residue_before = self._started
        now = self.clock()
        after = self.read()
        ran_s = now - started_at
        self._previous = (ran_s, now)
        record = {"load_before": before, "load_after": after, "cores": self.cores, "threads": self.threads,
                  "run_s": round(ran_s, 1)}
        if before is None or after is None:
            return dict(record, busy=None)
        other_before = max(before - residue_before, 0.0)
        own_after = own_load(self.threads, ran_s) + residue_before * math.exp(-ran_s / LOAD_TIME_CONSTANT_S)
        other_after = max(after - own_after, 0.0)
        busy = max(other_before, other_after) > BUSY_SHARE_OF_CORES * self.cores
        return dict(record, other_load_before=round(other_before, 2), other_load_after=round(other_after, 2), busy=busy)


def load_text(record: dict, warn: bool = True) -> str:
    """``load average 0.42 / 1.30 (other work 0.40 / 0.35) on 2 cores``, with a warning when busy (and ``warn``)."""
    if record.get("busy") is None:
        return "load average: not available"
    text = (f"load average before/after {record['load_before']:.2f} / {record['load_after']:.2f} (other work "
            f"{record['other_load_before']:.2f} / {record['other_load_after']:.2f}) on {record['cores']} cores")
    if record["busy"] and warn:
        text = "WARNING: the machine was busy, the time is unreliable: " + text
    return text
