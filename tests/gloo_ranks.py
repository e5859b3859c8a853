"""Run a function on P CPU processes joined by a gloo process group, and collect what each rank returns.

The distributed tests (DDP, DTensor/FSDP2, the vocabulary-parallel layout) share this: each rank
runs ``body(rank, world, *args)`` inside the group and saves what it returns; the parent waits
with a deadline (a hung collective fails the test instead of CI's limit) and loads every rank's
result. A rank ends with ``os._exit``, skipping gloo's teardown: torch 2.13 can deadlock there (the
process group's last reference, dropped with the GIL held, joins a gloo thread that waits for the
GIL to release a finished collective).
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank, world, port, path, body, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.save(body(rank, world, *args), f"{path}.{rank}")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def run_ranks(body, world: int, path: str, *, seconds: float, args=(), what: str = "distributed") -> list:
    """Every rank's ``body(rank, world, *args)`` (a module-level function: the processes are spawned),
    saved to ``<path>.<rank>`` and loaded back, in rank order; ``pytest.fail`` (the processes killed)
    when they do not finish within ``seconds``."""
    context = mp.spawn(_rank_entry, args=(world, free_port(), path, body, tuple(args)), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {world} {what} workers did not finish within {seconds} s")
    return [torch.load(f"{path}.{rank}") for rank in range(world)]
