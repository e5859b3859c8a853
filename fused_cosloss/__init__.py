"""fused_cosloss: a fused cross-entropy + embedding-cosine loss for causal language models."""
from .backends import available_backends
from .errors import FusedCosLossError, UnsupportedDifferentiationError
from .functional import MixedLossOutput, mixed_loss
from .linear import linear_mixed_loss
from .module import LinearMixedLoss, MixedLoss

__all__ = [
    "FusedCosLossError", "LinearMixedLoss", "MixedLoss", "MixedLossOutput", "available_backends", "linear_mixed_loss", "mixed_loss",
    "UnsupportedDifferentiationError",
]
__version__ = "0.1.0"
