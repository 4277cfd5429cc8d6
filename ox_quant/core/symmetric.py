"""Symmetric scales: three rules for the scale of a group whose zero point is fixed at ``mid``.

``mid = 2**(bits-1)``, ``qmax = 2**bits - 1``. Codes are unsigned, ``q in [0, qmax]``, and
dequantize to ``w' = (q - mid) * scale``. A scale may be negative: the ``2**bits`` levels
reach ``-mid * |scale|`` on one side of zero and ``(mid - 1) * |scale|`` on the other, and a
negative scale puts the longer side on the positive weights. Every format stores this as is
(MatMulNBits and the custom op: unsigned codes, default zero point ``mid``;
GatherBlockQuantized: the same; DequantizeLinear: signed ``q - mid`` in INT4/INT8, zero point 0).

Per group ``g`` (float32 arithmetic), ``ext = max(g) if |max(g)| > |min(g)| else min(g)``:

* ``absmax`` (balanced, no clipping): ``scale = absmax(g) / (mid - 1)``,
  ``q = clip(round(w / scale), -(mid - 1), mid - 1) + mid``. One level is unused (2 bits:
  ternary); ``|w - w'| <= scale / 2``.
* ``signed`` (ONNX Runtime's ``MatMulNBitsQuantizer``): ``scale = -ext / mid``, so ``ext``
  lands exactly on code 0 and the other side saturates at ``qmax``; codes computed as ONNX
  Runtime does, ``q = clip(round_half_away(w * (1 / scale) + mid), 0, qmax)`` in float32
  (``w / scale`` where ``1 / scale`` overflows). ``|w - w'| <= |scale|``.
* ``min-error`` (default): of these candidates, the one with the lowest squared error
  ``sum((w' - w)**2)`` (float64, summed one element at a time in row-major group order),
  ties to the earlier one:

  1. the ``signed`` scale and codes;
  2. the ``absmax`` scale and codes;
  3. ``-sign(ext) * max(|ext| / mid, b / (mid - 1))``, ``b`` the magnitude of the most
     extreme weight of the other sign: the smallest signed scale that clips nothing;

  codes of 3 by the nearest level, ``clip(round(w / scale), -mid, mid - 1) + mid``. Its
  error is therefore never above the ``signed`` or the ``absmax`` error of the group, and
  ``ext`` itself is never clipped.
* ``min-error-clip``: ``min-error``'s candidates and the clipped scales
  ``t * (-ext / mid)`` for each ``t`` in :data:`CLIP_GRID` (nearest-level codes). Lower
  weight error still, but clipping the largest weights costs some models output accuracy
  (docs/conventions.md has the measurements).

Each candidate scale is rounded to the stored dtype before its codes and error are
computed. A zero scale (all-zero group) codes every weight ``mid``. Rounding is half to even
except in ``signed``'s codes (half away from zero, as ONNX Runtime). A group whose
``signed`` scale is not finite (NaN/Inf weights, or a range the dtype cannot hold) keeps
that scale under ``min-error`` too, so that the caller reports it.

:func:`symmetric_group_reference` works on one group, one element at a time (slow,
obvious); :func:`symmetric_fast` on all groups at once; tests hold them equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ox_quant.core.config import SymmetricRule

CLIP_GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
"""Fractions of the ``signed`` scale tried by ``min-error-clip`` (clipping the largest weights)."""

CHUNK_ELEMENTS = 1 << 22
"""Weights handled at once by the ``min-error`` rules (their float64 temporaries scale with this)."""

f32 = np.float32
f64 = np.float64


# ----------------------------------------------------------------------------------
# Reference: one group, scalar arithmetic


def _stored(x: np.floating, scale_dtype: np.dtype) -> np.float32:
    """``x`` rounded to ``scale_dtype``, back as float32."""
    return f32(np.asarray(f32(x), dtype=scale_dtype))


def _nearest_code(w: np.float32, scale: np.float32, lo: int, hi: int, mid: int) -> int:
    if scale == 0:
        return mid
    return min(max(int(np.round(f32(w / scale))), lo), hi) + mid


def _signed_code(w: np.float32, scale: np.float32, mid: int, qmax: int) -> int:
    """ONNX Runtime's ``clamp(roundf(w * (1/scale) + mid), 0, qmax)``."""
    if scale == 0:
        return mid
    recip = f32(f32(1) / scale)
    v = f32(w * recip) if np.isfinite(recip) else f32(w / scale)
    x = float(f32(v + f32(mid)))
    rounded = math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)  # half away from zero
    return min(max(rounded, 0), qmax)


def _squared_error(group: np.ndarray, codes: np.ndarray, scale: np.float32, mid: int) -> float:
    """``sum(((q - mid) * scale - w)**2)`` in float64, element by element, row-major."""
    total = 0.0
    s = float(scale)
    for w, q in zip(group.ravel().tolist(), codes.ravel().tolist(), strict=True):
        e = (q - mid) * s - w
        total += e * e
    return total


def symmetric_group_reference(
    group: np.ndarray, bits: int, rule: SymmetricRule, scale_dtype: np.dtype
) -> tuple[np.float32, np.ndarray]:
    """(stored scale as float32, codes ``int64[gk, gn]``) of one float32 group ``[gk, gn]``."""
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    hi, lo = f32(np.max(group)), f32(np.min(group))
    ext = hi if abs(hi) > abs(lo) else lo
    raw_signed = f32(-ext / f32(mid))
    absmax = f32(np.max(np.abs(group)))

    def codes_of(code: Callable[[np.float32], int]) -> np.ndarray:
        return np.array([[code(w) for w in row] for row in group], dtype=np.int64).reshape(group.shape)

    signed = _stored(raw_signed, scale_dtype)
    signed_codes = codes_of(lambda w: _signed_code(w, signed, mid, qmax))
    if rule is SymmetricRule.SIGNED:
        return signed, signed_codes
    balanced = _stored(f32(absmax / f32(mid - 1)), scale_dtype)
    balanced_codes = codes_of(lambda w: _nearest_code(w, balanced, -(mid - 1), mid - 1, mid))
    if rule is SymmetricRule.ABSMAX:
        return balanced, balanced_codes

    other = max(f32(-lo), f32(0)) if ext > 0 else max(hi, f32(0))
    tight = max(f32(absmax / f32(mid)), f32(other / f32(mid - 1)))
    nearest_scales = [_stored(-tight if ext > 0 else tight, scale_dtype)]
    grid = CLIP_GRID if rule is SymmetricRule.MIN_ERROR_CLIP else ()
    nearest_scales += [_stored(f32(f32(t) * raw_signed), scale_dtype) for t in grid]
    candidates = [(signed, signed_codes), (balanced, balanced_codes)]
    for s in nearest_scales:
        def nearest(w: np.float32, s: np.float32 = s) -> int:
            return _nearest_code(w, s, -mid, mid - 1, mid)

        candidates.append((s, codes_of(nearest)))

    best_scale, best_codes = candidates[0]
    best_error = _squared_error(group, best_codes, best_scale, mid)
    for scale, codes in candidates[1:]:
        error = _squared_error(group, codes, scale, mid)
        if error < best_error:
            best_scale, best_codes, best_error = scale, codes, error
    if not np.isfinite(signed):
        return signed, best_codes
    return f32(best_scale + f32(0)), best_codes  # + 0: a zero scale is stored as +0.0


# ----------------------------------------------------------------------------------
# Fast: all groups of a zero-padded ``[R, gk, C, gn]`` view


def round_half_away_into_codes(x: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(roundf(x), 0, qmax)`` for float32 ``x`` (consumed as scratch): halves away from
    zero, as C's ``roundf``; exact in float32 (``floor`` then the fraction, never ``x + 0.5``,
    which rounds 0.49999997 up). Negative ``x`` clip to 0 whichever way they round."""
    np.maximum(x, f32(0), out=x)
    q = np.floor(x)
    x -= q
    q += x >= f32(0.5)
    np.clip(q, 0, qmax, out=q)
    return q


def nearest_codes(grouped: np.ndarray, scales: np.ndarray, lo: int, hi: int, mid: int) -> np.ndarray:
    """float32 codes ``clip(round(w / scale), lo, hi) + mid`` (``mid`` where the scale is 0)."""
    s = scales[:, None, :, None]
    zero = s == 0
    q = grouped / np.where(zero, f32(1), s) if zero.any() else grouped / s
    np.round(q, out=q)
    np.clip(q, lo, hi, out=q)
    q += f32(mid)
    if zero.any():
        np.copyto(q, f32(mid), where=zero)
    return q


def signed_codes(grouped: np.ndarray, scales: np.ndarray, mid: int, qmax: int) -> np.ndarray:
    """float32 codes ``clip(round_half_away(w * (1/scale) + mid), 0, qmax)`` (ONNX Runtime's)."""
    s = scales[:, None, :, None]
    zero = s == 0
    safe = np.where(zero, f32(1), s)
    recip = f32(1) / safe
    finite = np.isfinite(recip)
    x = grouped * np.where(finite, recip, f32(0))
    if not finite.all():  # 1/scale overflows for tiny scales: divide there
        np.copyto(x, grouped / safe, where=~finite)
    x += f32(mid)
    q = round_half_away_into_codes(x, qmax)
    if zero.any():
        np.copyto(q, f32(mid), where=zero)
    return q


LOOP_GROUP_SIZE = 4096
"""Groups up to this size are summed by a loop over their positions, larger ones by cumsum."""


def _squared_errors(grouped: np.ndarray, codes: np.ndarray, scales: np.ndarray, mid: int) -> np.ndarray:
    """Per-group float64 ``sum(((q - mid) * scale - w)**2)``, summed strictly left to right in
    row-major group order (the reference's order, so that both pick the same candidate)."""
    r, gk, c, gn = grouped.shape
    err = codes.astype(f64)
    err -= mid
    err *= scales.astype(f64)[:, None, :, None]
    err -= grouped
    err *= err
    if gk * gn <= LOOP_GROUP_SIZE:  # many small groups: one vector add per position
        total = np.zeros((r, c), dtype=f64)
        for i in range(gk):
            for j in range(gn):
                total += err[:, i, :, j]
        return total
    flat = err.transpose(0, 2, 1, 3).reshape(r, c, gk * gn)
    return np.cumsum(flat, axis=2)[:, :, -1]  # cumsum: strictly left to right


def symmetric_fast(
    grouped: np.ndarray, bits: int, rule: SymmetricRule, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(stored scales as ``float32[R, C]``, codes ``uint8[R, gk, C, gn]``) of a zero-padded
    float32 ``[R, gk, C, gn]`` view (zero padding changes no group's result)."""
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1

    def stored(a: np.ndarray) -> np.ndarray:
        return a.astype(scale_dtype).astype(f32)

    hi, lo = grouped.max(axis=(1, 3)), grouped.min(axis=(1, 3))
    ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    raw_signed = -ext / f32(mid)
    signed = stored(raw_signed)
    if rule is SymmetricRule.SIGNED:
        return signed, signed_codes(grouped, signed, mid, qmax).astype(np.uint8)
    absmax = np.abs(grouped).max(axis=(1, 3))
    balanced = stored(absmax / f32(mid - 1))
    if rule is SymmetricRule.ABSMAX:
        return balanced, nearest_codes(grouped, balanced, -(mid - 1), mid - 1, mid).astype(np.uint8)

    other = np.where(ext > 0, np.maximum(-lo, f32(0)), np.maximum(hi, f32(0)))
    tight = np.maximum(absmax / f32(mid), other / f32(mid - 1))
    grid = CLIP_GRID if rule is SymmetricRule.MIN_ERROR_CLIP else ()
    nearest = [stored(np.where(ext > 0, -tight, tight))] + [stored(f32(t) * raw_signed) for t in grid]

    r, gk, c, gn = grouped.shape
    scales = np.empty((r, c), dtype=f32)
    codes = np.empty(grouped.shape, dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // (r * gk * gn))
    for c0 in range(0, c, step):
        part = slice(c0, c0 + step)
        g = grouped[:, :, part, :]
        best_s = signed[:, part].copy()
        q = signed_codes(g, best_s, mid, qmax)
        best_e = _squared_errors(g, q, best_s, mid)
        best_q = q.astype(np.uint8)
        candidates = [(balanced[:, part], -(mid - 1), mid - 1)] + [(s[:, part], -mid, mid - 1) for s in nearest]
        for s, lo_q, hi_q in candidates:
            q = nearest_codes(g, s, lo_q, hi_q, mid)
            e = _squared_errors(g, q, s, mid)
            better = e < best_e
            np.copyto(best_e, e, where=better)
            np.copyto(best_s, s, where=better)
            np.copyto(best_q, q, where=better[:, None, :, None], casting="unsafe")
        scales[:, part] = best_s
        codes[:, :, part, :] = best_q
    bad = ~np.isfinite(signed)
    scales[bad] = signed[bad]
    return scales + f32(0), codes
