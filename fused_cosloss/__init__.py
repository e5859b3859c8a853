"""fused_cosloss: a fused cross-entropy + embedding-cosine loss for causal language models."""
from .backends import available_backends
from .functional import MixedLossOutput, mixed_loss
from .module import MixedLoss

__all__ = ["MixedLoss", "MixedLossOutput", "available_backends", "mixed_loss"]
__version__ = "0.1.0"
