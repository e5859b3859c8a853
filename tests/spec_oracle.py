"""A literal, slow transcription of docs/spec.md in float64, differentiated by autograd.

Nothing here is shared with the package: the top-k set is a Python sort by
(-value, index), the softmax is over that set, and every position is a loop step.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def spec_rows(z, y, E, temperature, topk, ignore_index):
    """Per-position (ce_n, 1 - cos_n, cos_n, argmax_n == y_n, valid_n) for z [N, V], y [N], E [V, H]."""
    n_rows, vocab = z.shape
    k = vocab if topk is None else min(topk, vocab)
    ce, dist, cos, correct, valid = [], [], [], [], []
    for n in range(n_rows):
        label = int(y[n])
        if label == ignore_index:
            zero = z.new_zeros(())
            ce.append(zero), dist.append(zero), cos.append(zero), correct.append(False), valid.append(False)
            continue
        row = z[n]
        values = row.detach().tolist()
        order = sorted(range(vocab), key=lambda i: (-values[i], i))
        chosen = order[:k]
        w = torch.softmax(row[chosen] / temperature, dim=0)
        mu = (w[:, None] * E[chosen]).sum(dim=0)
        e = E[label]
        c = torch.dot(mu, e) / (torch.clamp_min(mu.norm(), EPS) * torch.clamp_min(e.norm(), EPS))
        ce.append(-torch.log_softmax(row, dim=0)[label])  # logsumexp(row) - row[label], relative to the max
        dist.append(1 - c)
        cos.append(c)
        correct.append(order[0] == label)
        valid.append(True)
    stack = lambda xs: torch.stack(xs) if xs else z.new_zeros(0)  # noqa: E731
    return stack(ce), stack(dist), stack(cos), correct, valid


def spec_loss(z, y, E, *, alpha, temperature, topk, ignore_index=-100, reduction="mean"):
    """(loss, ce, cos_distance, n_valid, n_correct, cos_sim_sum) per docs/spec.md."""
    ce, dist, cos, correct, valid = spec_rows(z, y, E, temperature, topk, ignore_index)
    loss = alpha * dist + (1 - alpha) * ce
    n_valid = sum(valid)

    def reduce(values):
        if reduction == "none":
            return values
        total = values.sum()
        return total / n_valid if reduction == "mean" and n_valid > 0 else total

    n_correct = sum(c and v for c, v in zip(correct, valid))
    return reduce(loss), reduce(ce), reduce(dist), n_valid, n_correct, cos.detach().sum()
