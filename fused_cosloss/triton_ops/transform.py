"""The loss options that change the row (docs/spec.md, "Loss options"), as ``@triton.jit`` helpers:
every kernel that reads a logit z turns it into

    z' = c * tanh(s * z / c)      (s * z without the cap, z with neither)

as it loads it, with these helpers, so that every kernel computes bitwise the same z' from the
same z (the backward's membership test "v in S" compares a recomputed z' with the threshold the
forward found). z' is never stored: S's saved values stay the raw logits.

The scale and the cap are constexpr-guarded (``SCALE``, ``CAP``): with both off the helpers
return z itself and generate no code. The runtime numbers travel as ``scale``, ``inv_cap``
(1 / c, rounded to float32 on the host: the kernels multiply by it) and ``cap``.

``tanh`` is written here (triton's libdevice is not available to the interpreter): an odd
polynomial below |u| = 0.625, where (1 - e) / (1 + e) would lose bits to cancellation, and
``(1 - e) / (1 + e)`` with ``e = exp(-2 |u|)`` above (1 at +inf, -1 at -inf, NaN at NaN). Its
error against a float64 tanh is below 2 ulp of float32 (checked on a dense grid of [-12, 12]
when it was fitted; tests/test_options_triton.py holds the kernels' z' to the float64 oracle).
The Horner steps are explicit ``tl.fma``, so that no compiler contracts them differently in
different kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

# tanh(u) / u as a polynomial in u * u on [0, 0.625 ** 2] (a least-squares fit of relative error,
# max 4e-9); its u ** 1 coefficient is 1.
TANH_P1 = tl.constexpr(-0.3333325982093811)
TANH_P2 = tl.constexpr(0.13331127166748047)
TANH_P3 = tl.constexpr(-0.053721070289611816)
TANH_P4 = tl.constexpr(0.02059098891913891)
TANH_P5 = tl.constexpr(-0.005659989546984434)
TANH_SMALL = tl.constexpr(0.625)


@triton.jit
def tanh(u):
    """tanh of float32 ``u`` (any shape), in float32."""
    a = tl.abs(u)
    small = tl.minimum(a, TANH_SMALL)  # u itself where the polynomial is taken; no overflow elsewhere
    w = small * small
    p = tl.fma(w, TANH_P5, TANH_P4)
    p = tl.fma(w, p, TANH_P3)
    p = tl.fma(w, p, TANH_P2)
    p = tl.fma(w, p, TANH_P1)
    p = tl.fma(w, p, 1.0)
    e = tl.exp(-2.0 * a)
    big = tl.div_rn(1.0 - e, 1.0 + e)
    return tl.where(a < TANH_SMALL, u * p, tl.where(u < 0.0, -big, big))


@triton.jit
def transformed(z, scale, inv_cap, cap, SCALE: tl.constexpr, CAP: tl.constexpr):
    """z' of float32 logits ``z``: scaled (SCALE), then soft-capped (CAP); z itself with neither."""
    x = z
    if SCALE:
        x = x * scale
    if CAP:
        x = cap * tanh(x * inv_cap)
    return x


@triton.jit
def transformed_with_slope(z, scale, inv_cap, cap, SCALE: tl.constexpr, CAP: tl.constexpr):
    """(z', dz'/dz) of float32 logits ``z``: the slope is ``s * (1 - t * t)`` of the very t that z'
    is ``c * t`` of (0 where the cap saturates: at +-inf it is exactly 0), ``s`` without the cap,
    and 1 with neither (a constant the caller does not multiply by: see ``chain``)."""
    x = z
    slope = tl.full(z.shape, 1.0, tl.float32)
    if SCALE:
        x = x * scale
        slope = slope * scale
    if CAP:
        t = tanh(x * inv_cap)
        x = cap * t
        slope = slope * (1.0 - t * t)
    return x, slope


@triton.jit
def chain(dz_prime, slope, SCALE: tl.constexpr, CAP: tl.constexpr):
    """d/dz from d/dz' and the slope of ``transformed_with_slope`` (no multiply with neither option)."""
    if SCALE or CAP:
        return dz_prime * slope
    return dz_prime


def transform_args(options) -> dict:
    """The kernel arguments of the scale and the cap of ``options`` (a LossOptions): the numbers,
    and the constexpr flags that leave their code out when they are off."""
    cap = options.softcap
    return dict(scale=float(options.logit_scale), inv_cap=1.0 / cap if cap is not None else 1.0,
                cap=float(cap) if cap is not None else 1.0, SCALE=options.logit_scale != 1.0, CAP=cap is not None)


def smoothing_args(options) -> dict:
    """The kernel arguments of the label smoothing of ``options``: epsilon, and SMOOTH (epsilon != 0)."""
    return dict(smoothing=float(options.label_smoothing), SMOOTH=options.label_smoothing != 0.0)


def transforms(options) -> bool:
    """Whether the logits pass through a scale or a cap (S is then chosen by float32 keys of z')."""
    return options.logit_scale != 1.0 or options.softcap is not None
