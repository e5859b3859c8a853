"""``torch.compiler``'s function decorators without importing ``torch._dynamo`` with the package.

``torch.compiler.assume_constant_result`` and ``torch.compiler.disable`` import
``torch._dynamo`` when they decorate (about 1.4 s, and in an environment without numpy a
warning that ``python -W error`` turns into a failure). What they mark matters only while
``torch.compile`` traces, when ``torch._dynamo`` is loaded anyway; these do the same without
loading it at import time.
"""
from __future__ import annotations

import functools

import torch


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)``: that decorator only sets this attribute,
    which the tracer reads when it meets a call to ``fn`` (it calls ``fn`` once and keeps the
    result as a constant of the graph). tests/test_first_contact.py checks that it still marks
    a function exactly this way, and test_compile.py that the graph has no break."""
    fn._dynamo_marked_constant = True
    return fn


def disable(fn):
    """``torch.compiler.disable(fn)``: ``fn`` runs eagerly, a graph break, when called in traced
    code; ``torch._disable_dynamo`` (torch's own lazy form) imports ``torch._dynamo`` at that
    first traced call, and an eager call goes straight to ``fn``."""
    lazily_disabled = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return lazily_disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
