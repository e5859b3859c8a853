"""The package's own exceptions: raised where a call cannot compute its result exactly, so that
it never returns a plausible but wrong number."""
from __future__ import annotations


class FusedCosLossError(RuntimeError):
    """Base of the errors fused_cosloss raises for something it cannot compute exactly."""


class UnsupportedDifferentiationError(FusedCosLossError):
    """A higher-order gradient (``create_graph=True``) or a repeated backward that the path
    taken cannot compute exactly; the message names a path that can."""
