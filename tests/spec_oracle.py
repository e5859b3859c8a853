"""A literal, slow transcription of docs/spec.md in float64, differentiated by autograd.

Nothing here is shared with the package: the top-k set is a Python sort by
(-value, index), the softmax is over that set, and every position is a loop step.
The loss options (docs/spec.md, "Loss options") are written as their definitions:
the scale and the cap applied to the row first, the smoothed cross-entropy as
``(1 - eps) * nll + eps * mean_v(-log p_v)``, the z-loss as ``z_loss * logsumexp(row) ** 2``,
and the weight multiplying each position's loss, the mean dividing by the valid weights' sum.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def transformed_row(row, logit_scale=None, softcap=None):
    """The row every term sees: scaled, then soft-capped."""
    if logit_scale is not None:
        row = row * logit_scale
    if softcap is not None:
        row = softcap * torch.tanh(row / softcap)
    return row


def spec_rows(z, y, E, temperature, topk, ignore_index, *, logit_scale=None, softcap=None, label_smoothing=0.0,
              with_lse=False):
    """Per-position (ce_n, 1 - cos_n, cos_n, argmax_n == y_n, valid_n) for z [N, V], y [N], E [V, H]
    (and lse_n, the log-sum-exp of the transformed row, last when ``with_lse``)."""
    n_rows, vocab = z.shape
    k = vocab if topk is None else min(topk, vocab)
    ce, dist, cos, correct, valid, lse = [], [], [], [], [], []
    for n in range(n_rows):
        label = int(y[n])
        if label == ignore_index:
            zero = z.new_zeros(())
            ce.append(zero), dist.append(zero), cos.append(zero), correct.append(False), valid.append(False)
            lse.append(zero)
            continue
        row = transformed_row(z[n], logit_scale, softcap)
        values = row.detach().tolist()
        order = sorted(range(vocab), key=lambda i: (-values[i], i))
        chosen = order[:k]
        w = torch.softmax(row[chosen] / temperature, dim=0)
        mu = (w[:, None] * E[chosen]).sum(dim=0)
        e = E[label]
        c = torch.dot(mu, e) / (torch.clamp_min(mu.norm(), EPS) * torch.clamp_min(e.norm(), EPS))
        log_p = torch.log_softmax(row, dim=0)  # relative to the max
        nll = -log_p[label]
        ce.append(nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * log_p.mean())
        dist.append(1 - c)
        cos.append(c)
        correct.append(order[0] == label)
        valid.append(True)
        lse.append(torch.logsumexp(row, dim=0))
    stack = lambda xs: torch.stack(xs) if xs else z.new_zeros(0)  # noqa: E731
    out = (stack(ce), stack(dist), stack(cos), correct, valid)
    return (*out, stack(lse)) if with_lse else out


def spec_loss(z, y, E, *, alpha, temperature, topk, ignore_index=-100, reduction="mean", logit_scale=None,
              softcap=None, label_smoothing=0.0, z_loss=0.0, weight=None):
    """(loss, ce, cos_distance, n_valid, n_correct, cos_sim_sum, z_loss) per docs/spec.md.
    ``weight``: ``[N]`` per-position weights."""
    ce, dist, cos, correct, valid, lse = spec_rows(z, y, E, temperature, topk, ignore_index, logit_scale=logit_scale,
                                                   softcap=softcap, label_smoothing=label_smoothing, with_lse=True)
    zl = z_loss * lse ** 2
    if weight is not None:
        ce, dist, zl = weight * ce, weight * dist, weight * zl
    loss = alpha * dist + (1 - alpha) * ce + zl
    n_valid = sum(valid)
    total_weight = n_valid if weight is None else sum(weight[n] for n in range(len(valid)) if valid[n])

    def reduce(values):
        if reduction == "none":
            return values
        total = values.sum()
        return total / total_weight if reduction == "mean" and bool(total_weight != 0) else total

    n_correct = sum(c and v for c, v in zip(correct, valid))
    return reduce(loss), reduce(ce), reduce(dist), n_valid, n_correct, cos.detach().sum(), reduce(zl)
