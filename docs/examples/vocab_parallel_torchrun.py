"""The mixed loss over a vocabulary sharded across processes, on CPU (gloo) or CUDA (nccl):

    torchrun --nproc_per_node 2 docs/examples/vocab_parallel_torchrun.py

Each rank holds a contiguous range of the LM head's rows (tied: the embedding's); the hidden
states and labels are the same on every rank. Rank 0 checks the result against the loss of the
whole vocabulary computed in one process.
"""
import os

import torch
import torch.distributed as dist

from fused_cosloss import linear_mixed_loss


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same whole tensors on every rank; each keeps its shard
    vocab, hidden_size, tokens = 1000, 64, 512
    head = torch.randn(vocab, hidden_size, device=device) / hidden_size ** 0.5
    hidden = torch.randn(tokens, hidden_size, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=device)

    rows = torch.tensor_split(torch.arange(vocab), world)[rank]      # this rank's vocabulary range
    shard = head[rows[0]:rows[-1] + 1].clone().requires_grad_()
    loss = linear_mixed_loss(hidden, shard, labels, alpha=0.5, topk=32, process_group=dist.group.WORLD)
    loss.backward()                                                   # shard.grad: this rank's rows

    if rank == 0:
        whole_head = head.clone().requires_grad_()
        whole_hidden = hidden.detach().clone().requires_grad_()
        whole = linear_mixed_loss(whole_hidden, whole_head, labels, alpha=0.5, topk=32)
        whole.backward()
        print(f"{world} ranks: loss {loss.item():.6f}, whole vocabulary in one process {whole.item():.6f}")
        print(f"hidden grad max difference {(hidden.grad - whole_hidden.grad).abs().max().item():.2e}, "
              f"rank 0's head rows {(shard.grad - whole_head.grad[:len(rows)]).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
