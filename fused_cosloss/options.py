"""``LossOptions``: what every backend needs to know about the loss to compute its per-position terms."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The per-position terms' options, checked and resolved (see ``validation.py``).

    One frozen value travels from the public functions through the autograd Functions to the
    backend protocol (``protocol.py``); only the custom ops of ``compile_ops.py`` take its
    fields apart, because an op schema holds primitives.

    Attributes:
        temperature: T > 0 of the softmax over the selected logits.
        k: size of the selected set S, already ``min(topk, V)`` (V for ``topk=None``).
        ignore_index: the label of positions that contribute nothing.
        with_cos: whether the cosine term is computed (False: alpha = 0 without parts; the
            cosine outputs are then zeros and the embedding gets no gradient).
    """

    temperature: float
    k: int
    ignore_index: int
    with_cos: bool

    @classmethod
    def resolve(cls, *, temperature, topk, vocab: int, ignore_index, with_cos) -> "LossOptions":
        """The options for a vocabulary of ``vocab`` entries (``topk=None``: the whole vocabulary)."""
        k = vocab if topk is None else min(int(topk), vocab)
        return cls(float(temperature), int(k), int(ignore_index), bool(with_cos))

    def as_schema_args(self) -> tuple:
        """The fields in order, as primitives (for a custom op's schema)."""
        return self.temperature, self.k, self.ignore_index, self.with_cos
