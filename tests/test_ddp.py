"""DistributedDataParallel: 2 CPU processes (gloo) train a tiny tied model with ``mixed_loss``.

Semantics (as ``F.cross_entropy`` under DDP): each process takes the mean over its own valid
positions, and DDP averages the gradients over processes. So the DDP gradient is the average
of the single-process gradients of the shards, and, when every shard has the same number of
valid positions, the gradient of one process over the whole batch.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_cosloss import mixed_loss
from fused_cosloss.backends import why_unavailable

from helpers import assert_close_rel

VOCAB, HIDDEN, WORLD = 32, 8, 2
REL = 1e-5


class TiedLM(torch.nn.Module):
    """Embedding -> linear + tanh -> logits through the same embedding matrix (tied LM head)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, tokens):
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        return hidden @ self.embed.weight.T


def _model() -> TiedLM:
    torch.manual_seed(1234)
    return TiedLM()


def _loss(model, tokens, labels, backend):
    """The loss of ``model`` (a TiedLM, or DDP around one: its forward runs through DDP)."""
    logits = model(tokens)
    tied = getattr(model, "module", model).embed.weight
    return mixed_loss(logits, labels, tied, alpha=0.5, temperature=0.8, topk=6, shift=True,
                      reduction="mean", backend=backend)


def _batches():
    """Two scenarios of a [4, 7] batch split in two shards of 2 sequences: with ignored labels
    (the shards hold different numbers of valid positions), and with none."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (4, 7), generator=gen)
    ragged = tokens.clone()
    ragged[0, 4:] = -100  # shard 0: 12 - 3 = 9 valid positions, shard 1: 12 - 1 = 11
    ragged[3, 2] = -100
    return {"ragged": (tokens.clamp_min(0), ragged), "full": (tokens, tokens.clone())}


def _shard(tensor, rank):
    return tensor.chunk(WORLD)[rank]


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, port, backends, path):
    """Both ranks compute, rank 0 saves; then the process ends with os._exit, skipping the
    teardown of DDP and gloo: torch 2.13 can deadlock there (the last reference to the gloo
    process group, dropped with the GIL held, joins a gloo thread that waits for the GIL to
    release a finished collective)."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        results = {}
        for backend in backends:
            for scenario, (tokens, labels) in _batches().items():
                model = torch.nn.parallel.DistributedDataParallel(_model())
                loss = _loss(model, _shard(tokens, rank), _shard(labels, rank), backend)
                loss.backward()
                results[backend, scenario] = (loss.detach(), _grads(model.module))
        if rank == 0:
            torch.save(results, path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_with_deadline(worker, args, seconds):
    """mp.spawn of WORLD processes, failing (and killing them) after ``seconds`` instead of hanging."""
    import time

    context = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the DDP workers did not finish within {seconds} s")


def _single_process(tokens, labels, backend):
    model = _model()
    loss = _loss(model, tokens, labels, backend)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    probe = torch.empty(1, 1)
    backends = [name for name in ("reference", "native") if why_unavailable(name, probe, probe) is None]
    path = str(tmp_path / "ddp.pt")
    _spawn_with_deadline(_worker, (_free_port(), backends, path), seconds=300)
    results = torch.load(path)

    for backend in backends:
        for scenario, (tokens, labels) in _batches().items():
            _, ddp_grads = results[backend, scenario]
            shards = [_single_process(_shard(tokens, r), _shard(labels, r), backend) for r in range(WORLD)]
            what = f"{backend}/{scenario}"
            assert_close_rel(results[backend, scenario][0], shards[0][0], REL, f"{what} rank-0 loss")
            for name, grad in ddp_grads.items():
                average = sum(shard[1][name] for shard in shards) / WORLD
                assert_close_rel(grad, average, REL, f"{what} {name}: DDP vs mean of per-shard gradients")
            if scenario == "full":  # equal valid counts: DDP == one process over the whole batch
                _, whole = _single_process(tokens, labels, backend)
                for name, grad in ddp_grads.items():
                    assert_close_rel(grad, whole[name], REL, f"{what} {name}: DDP vs whole batch")
