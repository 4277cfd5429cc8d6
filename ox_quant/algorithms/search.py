"""What the parameter-searching algorithms (``mse``, ``hqq``) share: grouped views with a mask
and per-element weights, strictly ordered group sums, candidate errors, weighted least-squares
fits of a group's scale (and integer zero point), and the final per-group choice against
round-to-nearest.

Every sum over a group runs strictly left to right over the group's elements in row-major
order (a loop over positions for small groups, ``cumsum`` for large ones), in float64, so the
one-group-at-a-time references (``*_reference``) make the same choices bit for bit.

Per group ``g`` with codes ``q``, scale ``s`` (as stored), zero point ``z`` and element weights
``v`` (importance ``E[x_k^2]`` of the element's input channel, or 1; 0 on padding):

* error: ``sum_g v * ((q - z) * s - w)^2``;
* least-squares scale, zero point fixed (symmetric, or a refit): ``s = sum v (q-z) w / sum v (q-z)^2``;
* least-squares scale and offset (asymmetric): ``w ~ s q + b`` by weighted linear regression,
  then ``z = clip(round_half_away(-b / s), 0, qmax)`` and the scale refitted with that ``z``.

A fitted scale is rounded to the stored dtype; a fit that is not finite (or not positive,
asymmetric) gives no candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ox_quant.core.config import QuantConfig, SymmetricRule
from ox_quant.core.quantize import QuantizedWeight, group_sizes, grouped_codes, grouped_view, round_half_away
from ox_quant.core.symmetric import LOOP_GROUP_SIZE, _nearest_code, _signed_code

f32 = np.float32
f64 = np.float64


# ----------------------------------------------------------------------------------
# Fast: all groups of a zero-padded [R, gk, C, gn] view


class Groups:
    """``w[K, N]`` as a zero-padded float32 ``[R, gk, C, gn]`` view, with float64 element
    weights ``v`` of the same shape (importance per input channel, 0 on padding)."""

    def __init__(self, weight: np.ndarray, config: QuantConfig, importance: np.ndarray | None) -> None:
        w = np.asarray(weight, dtype=f32)
        self.k, self.n = w.shape
        self.gk, self.gn = group_sizes(config.granularity, self.k, self.n)
        self.w = grouped_view(w, self.gk, self.gn)
        r, gk, c, gn = self.w.shape
        rows = np.zeros(r * gk, dtype=f64)
        rows[: self.k] = 1.0 if importance is None else np.asarray(importance, dtype=f64)
        cols = np.zeros(c * gn, dtype=f64)
        cols[: self.n] = 1.0
        self.v = rows.reshape(r, gk, 1, 1) * cols.reshape(1, 1, c, gn)
        self.w64 = self.w.astype(f64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape[0], self.w.shape[2]


def group_sum(x: np.ndarray) -> np.ndarray:
    """``[R, C]`` sums of a float64 ``[R, gk, C, gn]`` array, strictly left to right in row-major group order."""
    r, gk, c, gn = x.shape
    if gk * gn <= LOOP_GROUP_SIZE:
        total = np.zeros((r, c), dtype=f64)
        for i in range(gk):
            for j in range(gn):
                total += x[:, i, :, j]
        return total
    flat = x.transpose(0, 2, 1, 3).reshape(r, c, gk * gn)
    return np.cumsum(flat, axis=2)[:, :, -1]


def errors(g: Groups, codes: np.ndarray, scales: np.ndarray, zps: np.ndarray) -> np.ndarray:
    """Per-group weighted squared error ``[R, C]`` of float32 ``codes`` under ``scales`` (float32) and ``zps``."""
    e = codes.astype(f64) - zps.astype(f64)[:, None, :, None]
    e *= scales.astype(f64)[:, None, :, None]
    e -= g.w64
    e *= e
    e *= g.v
    return group_sum(e)


def stored(x: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """float32 values rounded to ``scale_dtype``, back as float32."""
    return np.asarray(x, dtype=f32).astype(scale_dtype).astype(f32)


def fit_scale(g: Groups, codes: np.ndarray, zps: np.ndarray, target: np.ndarray) -> np.ndarray:
    """float64 ``[R, C]``: ``sum v (q - z) t / sum v (q - z)^2`` (NaN where the denominator is 0)."""
    d = codes.astype(f64) - zps.astype(f64)[:, None, :, None]
    num = group_sum(g.v * d * target)
    den = group_sum(g.v * d * d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def fit_affine(g: Groups, codes: np.ndarray, target: np.ndarray, config: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """Weighted regression ``t ~ s q + b`` per group, then the integer zero point and the refitted
    scale: ``(scale float64 [R, C] (NaN: no fit), zero point uint8 [R, C])``."""
    q = codes.astype(f64)
    sv = group_sum(g.v)
    sq = group_sum(g.v * q)
    st = group_sum(g.v * target)
    sqq = group_sum(g.v * q * q)
    sqt = group_sum(g.v * q * target)
    det = sv * sqq - sq * sq
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (sv * sqt - sq * st) / det
        b = (st - s * sq) / sv
        ok = (det > 0) & (sv > 0) & np.isfinite(s) & (s > 0)
        zf = np.where(ok, -b / np.where(ok, s, 1.0), 0.0)
    zp = np.clip(round_half_away(np.where(np.isfinite(zf), zf, 0.0)), 0, config.qmax).astype(np.uint8)
    refit = fit_scale(g, codes, zp, target)
    return np.where(ok & (refit > 0), refit, np.nan), zp


class Best:
    """The best parameters per group so far (lowest error; ties keep the earlier)."""

    def __init__(self, g: Groups, scales: np.ndarray, zps: np.ndarray, config: QuantConfig) -> None:
        self.g, self.config = g, config
        self.scales = scales.astype(f32).copy()
        self.zps = zps.copy()
        self.codes = grouped_codes(g.w, self.scales, self.zps, config)
        self.error = errors(g, self.codes, self.scales, self.zps)

    def offer(self, scales: np.ndarray, zps: np.ndarray) -> np.ndarray:
        """Candidate stored scales (float32; NaN, Inf or 0: no candidate for that group) and zero
        points; returns the candidate's codes (the current best's where there was none)."""
        valid = np.isfinite(scales) & (scales != 0)
        s = np.where(valid, scales, self.scales).astype(f32)
        z = np.where(valid, zps, self.zps).astype(np.uint8)
        codes = grouped_codes(self.g.w, s, z, self.config)
        e = errors(self.g, codes, s, z)
        better = valid & (e < self.error)
        np.copyto(self.error, e, where=better)
        np.copyto(self.scales, s, where=better)
        np.copyto(self.zps, z, where=better)
        np.copyto(self.codes, codes, where=better[:, None, :, None])
        return codes


def against_rtn(g: Groups, best: Best, rtn: QuantizedWeight) -> QuantizedWeight:
    """Per group, the search's result or round-to-nearest's own (its codes as it rounded them),
    whichever has the lower weighted error (ties: round-to-nearest)."""
    rows, cols = best.scales.shape
    r_scales = rtn.scales.astype(f32)
    r_codes = grouped_view(rtn.codes.astype(f32), g.gk, g.gn)
    r_error = errors(g, r_codes, r_scales, rtn.zero_points)
    take = best.error < r_error
    scales = np.where(take, best.scales, r_scales).astype(rtn.scales.dtype)
    zps = np.where(take, best.zps, rtn.zero_points).astype(np.uint8)
    codes = np.where(take[:, None, :, None], best.codes, r_codes)
    codes_kn = np.ascontiguousarray(codes.astype(np.uint8).reshape(rows * g.gk, cols * g.gn)[: g.k, : g.n])
    return QuantizedWeight(codes_kn, scales, zps, rtn.bits, rtn.granularity, rtn.symmetric)


# ----------------------------------------------------------------------------------
# Reference: one group, one element at a time


def element_weights_reference(importance: np.ndarray | None, k0: int, gk: int, gn: int) -> list[list[float]]:
    """``v`` of a group whose first row is input channel ``k0`` (``gk x gn``, real elements only)."""
    return [[1.0 if importance is None else float(importance[k0 + i]) for _ in range(gn)] for i in range(gk)]


def code_reference(w: np.float32, scale: np.float32, zp: int, config: QuantConfig) -> int:
    """One element's code, as :func:`ox_quant.core.quantize.quantize_with` computes it."""
    if config.symmetric:
        if config.symmetric_rule is SymmetricRule.SIGNED:
            return _signed_code(w, scale, config.mid, config.qmax)
        return _nearest_code(w, scale, -config.mid, config.mid - 1, config.mid)
    if scale == 0:
        return zp
    with np.errstate(over="ignore"):
        inverse = f32(f32(1) / scale)
    x = f32(w * inverse) if np.isfinite(inverse) else f32(w / scale)
    r = int(round_half_away(f32(x + f32(zp))))
    return min(max(r, 0), config.qmax)


def codes_reference(group: np.ndarray, scale: np.float32, zp: int, config: QuantConfig) -> list[list[int]]:
    return [[code_reference(group[i, j], scale, zp, config) for j in range(group.shape[1])]
            for i in range(group.shape[0])]


def error_reference(group: np.ndarray, codes: list[list[int]], scale: np.float32, zp: int,
                    v: list[list[float]]) -> float:
    """``sum v ((q - z) s - w)^2``, element by element, row-major."""
    total = 0.0
    s = float(scale)
    for i in range(group.shape[0]):
        for j in range(group.shape[1]):
            e = (float(codes[i][j]) - float(zp)) * s - float(group[i, j])
            total += (e * e) * v[i][j]
    return total


def fit_scale_reference(codes: list[list[int]], zp: int, target: list[list[float]], v: list[list[float]]) -> float:
    num = den = 0.0
    for i, row in enumerate(codes):
        for j, q in enumerate(row):
            d = float(q) - float(zp)
            num += v[i][j] * d * target[i][j]
            den += v[i][j] * d * d
    return num / den if den > 0 else math.nan


def fit_affine_reference(codes: list[list[int]], target: list[list[float]], v: list[list[float]],
                         config: QuantConfig) -> tuple[float, int]:
    sv = sq = st = sqq = sqt = 0.0
    for i, row in enumerate(codes):
        for j, qi in enumerate(row):
            q, t, vv = float(qi), target[i][j], v[i][j]
            sv += vv
            sq += vv * q
            st += vv * t
            sqq += vv * q * q
            sqt += vv * q * t
    det = sv * sqq - sq * sq
    if not (det > 0 and sv > 0):
        return math.nan, 0
    s = (sv * sqt - sq * st) / det
    b = (st - s * sq) / sv
    if not (math.isfinite(s) and s > 0):
        return math.nan, 0
    zf = -b / s
    zp = int(np.clip(round_half_away(f64(zf if math.isfinite(zf) else 0.0)), 0, config.qmax))
    refit = fit_scale_reference(codes, zp, target, v)
    return (refit if refit > 0 else math.nan), zp


def stored_reference(x: float | np.floating, scale_dtype: np.dtype) -> np.float32:
    return f32(np.asarray(f32(x), dtype=scale_dtype))


class BestReference:
    """:class:`Best` for one group, one element at a time."""

    def __init__(self, group: np.ndarray, v: list[list[float]], scale: np.float32, zp: int,
                 config: QuantConfig) -> None:
        self.group, self.v, self.config = group, v, config
        self.scale, self.zp = f32(scale), zp
        self.codes = codes_reference(group, self.scale, zp, config)
        self.error = error_reference(group, self.codes, self.scale, zp, v)

    def offer(self, scale: float | np.floating, zp: int) -> list[list[int]]:
        s = f32(scale)
        if not (np.isfinite(s) and s != 0):
            return self.codes
        q = codes_reference(self.group, s, zp, self.config)
        e = error_reference(self.group, q, s, zp, self.v)
        if e < self.error:
            self.scale, self.zp, self.codes, self.error = s, zp, q, e
        return q

    def against_rtn(self, rtn_codes: list[list[int]], scale: np.float32, zp: int) -> bool:
        """Whether this group's search result beats round-to-nearest's own codes (strictly)."""
        return self.error < error_reference(self.group, rtn_codes, scale, zp, self.v)


CHUNK_ELEMENTS = 1 << 20
"""Weights searched at once: whole column groups up to about this many elements (the float64
temporaries of a search are a few times this); groups are independent, so chunks change nothing."""


def by_column_chunks(
    search: Callable[[np.ndarray, QuantConfig, np.dtype, np.ndarray | None], QuantizedWeight],
    weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, importance: np.ndarray | None,
) -> QuantizedWeight:
    """``search`` run on column slices of ``weight[K, N]`` made of whole column groups, the
    results put side by side (per-tensor weights are one group: searched whole)."""
    k, n = weight.shape
    _, gn = group_sizes(config.granularity, k, n)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, k * gn)) * gn
    if per_chunk >= n:
        return search(weight, config, scale_dtype, importance)
    parts = [search(weight[:, c0:c0 + per_chunk], config, scale_dtype, importance) for c0 in range(0, n, per_chunk)]
    first = parts[0]
    return QuantizedWeight(
        np.concatenate([p.codes for p in parts], axis=1),
        np.concatenate([p.scales for p in parts], axis=1),
        np.concatenate([p.zero_points for p in parts], axis=1),
        first.bits, first.granularity, first.symmetric,
    )
