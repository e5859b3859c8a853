"""``MixedLoss``: the mixed loss as an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import nn

from ._validation import check_scalars
from .functional import mixed_loss


class MixedLoss(nn.Module):
    """Cross-entropy mixed with an embedding-space cosine distance; see :func:`mixed_loss`.

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
    ):
        super().__init__()
        check_scalars(alpha, temperature, topk, reduction, backend)
        self.alpha = alpha
        self.temperature = temperature
        self.topk = topk
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shift = shift
        self.backend = backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, return_parts: bool = False):
        return mixed_loss(
            logits, labels, embedding, alpha=self.alpha, temperature=self.temperature, topk=self.topk,
            ignore_index=self.ignore_index, reduction=self.reduction, shift=self.shift, backend=self.backend,
            return_parts=return_parts,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, topk={self.topk}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, shift={self.shift}, backend={self.backend!r}"
        )
