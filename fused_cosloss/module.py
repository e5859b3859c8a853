"""``MixedLoss`` and ``LinearMixedLoss``: the mixed loss as ``nn.Module``s."""
from __future__ import annotations

import torch
from torch import nn

from .validation import check_chunk_size, check_flag, check_ignore_index, check_loss_options, check_scalars
from .functional import mixed_loss
from .linear import linear_mixed_loss
from .vocab_parallel import check_process_group


class _LossModule(nn.Module):
    """The options both loss modules share, checked once at construction."""

    def __init__(self, alpha, temperature, topk, ignore_index, reduction, shift, backend, loss_options,
                 process_group=None, vocab_start=None):
        super().__init__()
        check_process_group(process_group, vocab_start)
        self.process_group, self.vocab_start = process_group, vocab_start
        alpha, temperature, topk = check_scalars(alpha, temperature, topk, reduction, backend)
        self.logit_scale, self.softcap, self.label_smoothing, self.z_loss = check_loss_options(**loss_options)
        check_flag("shift", shift)
        self.alpha = alpha
        self.temperature = temperature
        self.topk = topk
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = reduction
        self.shift = shift
        self.backend = backend

    def _options(self) -> dict:
        return dict(alpha=self.alpha, temperature=self.temperature, topk=self.topk, ignore_index=self.ignore_index,
                    reduction=self.reduction, shift=self.shift, backend=self.backend, process_group=self.process_group,
                    vocab_start=self.vocab_start, **self._loss_options())

    def _loss_options(self) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss)

    def extra_repr(self) -> str:
        defaults = dict(logit_scale=None, softcap=None, label_smoothing=0.0, z_loss=0.0)
        changed = "".join(f", {name}={value}" for name, value in self._loss_options().items()
                          if value != defaults[name])
        if self.process_group is not None:
            changed += f", process_group=<{self.process_group.size()} ranks>"
            if self.vocab_start is not None:
                changed += f", vocab_start={self.vocab_start}"
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, topk={self.topk}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, shift={self.shift}, backend={self.backend!r}"
            f"{changed}"
        )


class MixedLoss(_LossModule):
    """Cross-entropy mixed with an embedding-space cosine distance; see :func:`mixed_loss`.

    ``process_group`` / ``vocab_start``: the vocabulary sharded across processes (docs/vocab_parallel.md).

    Example::

        loss_fn = MixedLoss(alpha=0.5, topk=256, shift=True)
        loss = loss_fn(model_output.logits, input_ids, model.get_input_embeddings().weight)
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        topk: int | None = 256,
        ignore_index: int = -100,
        reduction: str = "mean",
        shift: bool = False,
        backend: str = "auto",
        inplace_grad: bool = False,
        grad_in_forward: bool | None = None,
        *,
        logit_scale: float | None = None,
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        process_group=None,
        vocab_start: int | None = None,
    ):
        super().__init__(alpha, temperature, topk, ignore_index, reduction, shift, backend,
                         dict(logit_scale=logit_scale, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss),
                         process_group, vocab_start)
        check_flag("inplace_grad", inplace_grad)
        check_flag("grad_in_forward", grad_in_forward, optional=True)
        self.inplace_grad = inplace_grad
        self.grad_in_forward = grad_in_forward

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, return_parts: bool = False,
                weight: torch.Tensor | None = None):
        """The loss of ``logits`` against ``labels``; ``weight``: per-position weights (see :func:`mixed_loss`)."""
        return mixed_loss(logits, labels, embedding, return_parts=return_parts, inplace_grad=self.inplace_grad,
                          grad_in_forward=self.grad_in_forward, weight=weight, **self._options())

    def extra_repr(self) -> str:
        extra = ", inplace_grad=True" if self.inplace_grad else ""
        if self.grad_in_forward is not None:
            extra += f", grad_in_forward={self.grad_in_forward}"
        return super().extra_repr() + extra


class LinearMixedLoss(_LossModule):
    """The mixed loss from hidden states and the LM head weight, without materialising the
    logits; see :func:`linear_mixed_loss`.

    Example::

        loss_fn = LinearMixedLoss(alpha=0.5, topk=256, shift=True)
        hidden = model.model(input_ids).last_hidden_state          # [B, T, H]
        loss = loss_fn(hidden, model.lm_head.weight, input_ids)     # tied: embedding = weight
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, topk: int | None = 256, ignore_index: int = -100,
                 reduction: str = "mean", shift: bool = False, backend: str = "auto", chunk_size: int | None = None, *,
                 logit_scale: float | None = None, softcap: float | None = None, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, process_group=None, vocab_start: int | None = None):
        super().__init__(alpha, temperature, topk, ignore_index, reduction, shift, backend,
                         dict(logit_scale=logit_scale, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss),
                         process_group, vocab_start)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                embedding: torch.Tensor | None = None, bias: torch.Tensor | None = None, return_parts: bool = False,
                position_weight: torch.Tensor | None = None):
        """The loss of ``hidden @ weight.T + bias`` against ``labels``; ``position_weight``: per-position
        weights (see :func:`linear_mixed_loss`)."""
        return linear_mixed_loss(hidden, weight, labels, embedding=embedding, bias=bias, return_parts=return_parts,
                                 chunk_size=self.chunk_size, position_weight=position_weight, **self._options())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
