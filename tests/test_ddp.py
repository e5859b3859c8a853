"""DistributedDataParallel: 2 CPU processes (gloo) train a tiny tied model with ``mixed_loss``.

Semantics (as ``F.cross_entropy`` under DDP): each process takes the mean over its own valid
positions, and DDP averages the gradients over processes. So the DDP gradient is the average
of the single-process gradients of the shards, and, when every shard has the same number of
valid positions, the gradient of one process over the whole batch.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fused_cosloss import mixed_loss
from fused_cosloss.backends import why_unavailable

from gloo_ranks import run_ranks
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


def _ddp_results(rank, world, backends):
    """This rank's loss and gradients of one DDP step per backend and scenario (run by gloo_ranks)."""
    results = {}
    for backend in backends:
        for scenario, (tokens, labels) in _batches().items():
            model = torch.nn.parallel.DistributedDataParallel(_model())
            loss = _loss(model, _shard(tokens, rank), _shard(labels, rank), backend)
            loss.backward()
            results[backend, scenario] = (loss.detach(), _grads(model.module))
    return results


def _single_process(tokens, labels, backend):
    model = _model()
    loss = _loss(model, tokens, labels, backend)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    probe = torch.empty(1, 1)
    backends = [name for name in ("reference", "native") if why_unavailable(name, probe, probe) is None]
    results = run_ranks(_ddp_results, WORLD, str(tmp_path / "ddp"), seconds=300, args=(backends,), what="DDP")[0]

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
