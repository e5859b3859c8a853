"""DTensor inputs on 2 CPU processes (gloo): a tiny tied model under FSDP2's ``fully_shard`` whose
loss runs outside the root's unsharded window (``reshard_after_forward=True``: the embedding is a
``DTensor`` sharded on its rows, 17 and 16 of 33), on the reference and the native backend, for
``mixed_loss`` and ``linear_mixed_loss``; and tensor-parallel ``DTensor`` logits (sharded on the
vocabulary) with a row-sharded embedding. Losses and gradients equal the unsharded run's: under
FSDP2, as under DDP, each rank averages over its own positions and the gradients are averaged over
the ranks, so with equal valid counts they are those of one process over the whole batch.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from fused_cosloss import linear_mixed_loss, mixed_loss
from fused_cosloss.backends import why_unavailable

from gloo_ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

VOCAB, HIDDEN, WORLD = 33, 8, 2
LOSS = dict(alpha=0.5, temperature=0.8, topk=5, shift=True)


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, tokens, hidden_only=False):
        """The logits, or the last hidden states (for the fused-linear mode, as a base model returns them)."""
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        return hidden if hidden_only else hidden @ self.embed.weight.T


def _model() -> TiedLM:
    torch.manual_seed(1234)
    return TiedLM()


def _tokens():
    return torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(7))


def _loss(model, tokens, backend, fused_linear):
    if fused_linear:  # the model's hidden states in its forward; the LM head in the loss
        return linear_mixed_loss(model(tokens, hidden_only=True), model.embed.weight, tokens, backend=backend, **LOSS)
    return mixed_loss(model(tokens), tokens, model.embed.weight, backend=backend, **LOSS)


def _backends():
    probe = torch.empty(1, 1)
    return [name for name in ("reference", "native") if why_unavailable(name, probe, probe) is None]


def _fsdp_results(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for backend in _backends():
        for fused_linear in (False, True):
            model = _model()
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
            tokens = _tokens().chunk(WORLD)[rank]
            out = model(tokens, hidden_only=fused_linear)
            # the forward is over: the parameters are sharded again
            assert isinstance(model.embed.weight, DTensor) and model.embed.weight.placements == (Shard(0),)
            if fused_linear:
                loss = linear_mixed_loss(out, model.embed.weight, tokens, backend=backend, **LOSS)
            else:
                loss = mixed_loss(out, tokens, model.embed.weight, backend=backend, **LOSS)
            loss.backward()
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
            results[backend, fused_linear] = (loss.detach(), grads)
    return results


def _tensor_parallel_results(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, VOCAB, generator=gen, dtype=torch.float64)
    embedding = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    sharded_logits = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    sharded_embedding = distribute_tensor(embedding, mesh, [Shard(0)]).requires_grad_()
    loss = mixed_loss(sharded_logits, distribute_tensor(labels, mesh, [Replicate()]), sharded_embedding,
                      backend="reference", **LOSS)
    loss.backward()
    return loss.detach(), sharded_logits.grad.full_tensor(), sharded_embedding.grad.full_tensor()


def _tensor_parallel_model_results(rank, model_dir):
    """A tiny untied Llama loaded with transformers' tp_plan (its LM head and embedding sharded by
    rows, as DTensors; its logits gathered): the loss on the same batch on both ranks, each
    parameter's whole gradient, on the reference and the native backend."""
    import transformers

    results = {}
    for backend in _backends():
        with warnings.catch_warnings():  # transformers 5.x: tp_plan= is to become distributed_config=
            warnings.simplefilter("ignore", FutureWarning)
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto")
        tokens = _tokens()
        embedding = model.get_input_embeddings().weight
        loss = mixed_loss(model(tokens).logits, tokens, embedding, backend=backend, **LOSS)
        loss.backward()
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for name, p in model.named_parameters() if p.grad is not None}
        layout = (type(embedding).__name__, str(getattr(embedding, "placements", None)))
        results[backend] = (loss.detach(), grads, layout, getattr(model, "tp_size", None))
    return results


def _tiny_llama(path):
    import transformers

    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=VOCAB + 1, hidden_size=HIDDEN * 2, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def _refusal(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    logits = distribute_tensor(torch.randn(4, VOCAB), mesh, [Replicate()])
    try:
        mixed_loss(logits, torch.zeros(4, dtype=torch.long), torch.randn(VOCAB, HIDDEN))
    except ValueError as error:
        return str(error)
    return None


def _rank_results(rank, world, model_dir):
    """This rank's results of every check (run by gloo_ranks)."""
    results = {"fsdp": _fsdp_results(rank), "tp": _tensor_parallel_results(rank), "refusal": _refusal(rank)}
    if model_dir is not None:  # transformers reads the layout from torchrun's variables
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        results["tp_model"] = _tensor_parallel_model_results(rank, model_dir)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtensor")
    path = str(folder / "results")
    model_dir = None
    if importlib.util.find_spec("transformers") is not None:
        model_dir = str(folder / "tiny_llama")
        _tiny_llama(model_dir)
    return run_ranks(_rank_results, WORLD, path, seconds=300, args=(model_dir,), what="DTensor")


def _close(got, want, what, rel=1e-5):
    error = (got.double() - want.double()).abs().max().item()
    scale = max(want.abs().max().item(), 1e-3)
    assert error <= rel * scale, f"{what}: max error {error:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_fully_shard_gradients_equal_the_unsharded_run(results, backend, fused_linear):
    if backend not in _backends():
        pytest.skip(f"{backend} is not available here")
    model = _model()
    tokens = _tokens()
    whole_loss = _loss(model, tokens, backend, fused_linear)
    whole_loss.backward()
    per_rank = [_loss(_model(), part, backend, fused_linear).item() for part in tokens.chunk(WORLD)]
    for rank, result in enumerate(results):
        loss, grads = result["fsdp"][backend, fused_linear]
        _close(loss, torch.tensor(per_rank[rank]), f"rank {rank}'s loss (its own positions)")
        for name, param in model.named_parameters():
            _close(grads[name], param.grad, f"rank {rank}'s gradient of {name} under fully_shard vs one process")


def test_tensor_parallel_dtensor_logits_equal_the_whole_vocabulary(results):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, VOCAB, generator=gen, dtype=torch.float64).requires_grad_()
    embedding = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    loss = mixed_loss(logits, labels, embedding, backend="reference", **LOSS)
    loss.backward()
    for rank, result in enumerate(results):
        got_loss, got_logits_grad, got_embedding_grad = result["tp"]
        _close(got_loss, loss.detach(), f"rank {rank}'s loss", rel=1e-12)
        _close(got_logits_grad, logits.grad, f"rank {rank}'s logits gradient", rel=1e-12)
        _close(got_embedding_grad, embedding.grad, f"rank {rank}'s embedding gradient", rel=1e-12)


def test_an_unsupported_layout_names_the_argument_and_the_fix(results):
    for result in results:
        assert result["refusal"] is not None and result["refusal"].startswith("logits: a DTensor is accepted")
        assert "full_tensor()" in result["refusal"]


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_tensor_parallel_transformers_model_gets_the_gradients_of_one_process(results, backend, tmp_path):
    """transformers' tp_plan shards a Llama's LM head and embedding by rows (DTensors) and gathers its
    logits: the loss with the sharded embedding (gathered for the call) gives every parameter the
    gradient one process computes on the same batch."""
    transformers = pytest.importorskip("transformers")
    if backend not in _backends():
        pytest.skip(f"{backend} is not available here")
    _tiny_llama(tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokens = _tokens()
    whole = mixed_loss(model(tokens).logits, tokens, model.get_input_embeddings().weight, backend=backend, **LOSS)
    whole.backward()
    for rank, result in enumerate(results):
        loss, grads, layout, tp_size = result["tp_model"][backend]
        assert layout == ("DTensor", "(Shard(dim=0),)") and tp_size == WORLD  # the layout the test means
        _close(loss, whole.detach(), f"rank {rank}'s loss")
        for name, param in model.named_parameters():
            _close(grads[name], param.grad, f"rank {rank}'s gradient of {name} under tp_plan vs one process")
