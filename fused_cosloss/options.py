"""``LossOptions``: what every backend needs to know about the loss to compute its per-position terms."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The per-position terms' options, checked and resolved (see ``validation.py``).

    One frozen value travels from the public functions through the autograd Functions to the
    backend protocol (``protocol.py``); only the custom ops of ``compile_ops.py`` take its
    fields apart, because an op schema holds primitives. What only weighs the per-position
    terms (alpha, z_loss, the per-position weight, the reduction) is not here: it becomes the
    coefficients the backward receives (``loss_math.py``).

    Attributes:
        temperature: T > 0 of the softmax over the selected logits.
        k: size of the selected set S, already ``min(topk, V)`` (V for ``topk=None``).
        ignore_index: the label of positions that contribute nothing.
        with_cos: whether the cosine term is computed (False: alpha = 0 without parts; the
            cosine outputs are then zeros and the embedding gets no gradient).
        logit_scale: s > 0; every logit is multiplied by it first (1.0: off).
        softcap: c > 0 or None; after the scale every logit x becomes ``c * tanh(x / c)``.
        label_smoothing: epsilon in [0, 1] of the cross-entropy part (0.0: off).
    """

    temperature: float
    k: int
    ignore_index: int
    with_cos: bool
    logit_scale: float = 1.0
    softcap: float | None = None
    label_smoothing: float = 0.0

    @classmethod
    def resolve(cls, *, temperature, topk, vocab: int, ignore_index, with_cos, logit_scale=None, softcap=None,
                label_smoothing=0.0) -> "LossOptions":
        """The options for a vocabulary of ``vocab`` entries (``topk=None``: the whole vocabulary;
        ``logit_scale=None``: 1)."""
        k = vocab if topk is None else min(int(topk), vocab)
        return cls(float(temperature), int(k), int(ignore_index), bool(with_cos),
                   1.0 if logit_scale is None else float(logit_scale), None if softcap is None else float(softcap),
                   float(label_smoothing))

    @property
    def transforms_logits(self) -> bool:
        """Whether the logits pass through a scale or a soft-cap before anything else."""
        return self.logit_scale != 1.0 or self.softcap is not None

    def as_schema_args(self) -> tuple:
        """The fields in order, as primitives (for a custom op's schema; no soft-cap is 0.0)."""
        return (self.temperature, self.k, self.ignore_index, self.with_cos, self.logit_scale,
                0.0 if self.softcap is None else self.softcap, self.label_smoothing)

    @classmethod
    def from_schema_args(cls, temperature, k, ignore_index, with_cos, logit_scale, softcap, label_smoothing):
        """The inverse of ``as_schema_args``."""
        return cls(float(temperature), int(k), int(ignore_index), bool(with_cos), float(logit_scale),
                   None if softcap == 0.0 else float(softcap), float(label_smoothing))
