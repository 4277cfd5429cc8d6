"""``hqq``: half-quadratic optimisation of each group's scale and zero point, data-free.

HQQ (Badri and Shaji, 2023) fits the quantization parameters to an ``lp`` (``p < 1``) norm of
the weight error, which tolerates a few large errors (outliers) instead of spreading error
over every weight. Half-quadratic splitting adds the error ``e`` as an extra variable and
alternates two closed-form steps per group ``g`` (codes ``q`` from the current ``s, z``):

1. shrink the residual: ``x = w - (q - z) s``, ``e = sign(x) max(|x| - |x|^(p-1) / beta, 0)``
   (the proximal step of ``|e|^p``);
2. fit the parameters to ``w - e``: asymmetric, the least-squares scale and offset with the
   zero point rounded to the integer grid ONNX formats store, then the scale refitted
   (``ox_quant.algorithms.search.fit_affine``); symmetric, the least-squares scale with the
   zero point at ``mid``;

then ``beta *= KAPPA``, for :data:`ITERATIONS` rounds, starting from round-to-nearest. HQQ
proper keeps a float zero point and updates only it; ONNX formats store an integer zero
point per group, so here the scale moves too. ``p = 1/2`` (the paper's default is 0.7): the
shrink is then a square root, which is correctly rounded, so the reference and the fast path
agree bit for bit. Each round's parameters are candidates; each group keeps those with the
lowest squared weight error ``sum ((q - z) s - w)^2`` (round-to-nearest's own result where it
is not worse), so ``hqq`` is never worse than ``rtn`` on weight error. Calibration statistics
are not used.

All granularities and bits 2-8 (the fit is per group, whatever its shape).
"""

from __future__ import annotations

import math

import numpy as np

from ox_quant.algorithms.base import Needs, SiteStats
from ox_quant.algorithms.search import (
    Best,
    BestReference,
    Groups,
    against_rtn,
    by_column_chunks,
    codes_reference,
    element_weights_reference,
    fit_affine,
    fit_affine_reference,
    fit_scale,
    fit_scale_reference,
    stored,
    stored_reference,
)
from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import (
    QParams,
    QuantizedWeight,
    choose_qparams,
    group_sizes,
    grouped_codes,
    quantize,
    quantize_reference,
)

BETA = 10.0
"""Initial penalty of the split (HQQ's default)."""
KAPPA = 1.01
"""Growth of ``beta`` per round (HQQ's default)."""
ITERATIONS = 20
"""Rounds (HQQ's default)."""

f32 = np.float32
f64 = np.float64


def shrink(x: np.ndarray, beta: float) -> np.ndarray:
    """``sign(x) max(|x| - |x|^(-1/2) / beta, 0)`` elementwise (float64; 0 where ``x`` is 0)."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        r = 1.0 / np.sqrt(a)
    return np.copysign(np.maximum(a - r / beta, 0.0), x)


def hqq_quantize(weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 stats: SiteStats | None = None) -> QuantizedWeight:
    """The search over all groups of ``weight[K, N]``, in chunks of whole column groups."""
    w = np.asarray(weight, dtype=f32)
    imp = None
    return by_column_chunks(_hqq_quantize, w, config, np.dtype(scale_dtype), imp)


def _hqq_quantize(w: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 importance: np.ndarray | None) -> QuantizedWeight:
    """Vectorised HQQ (module docstring) over all groups of ``w[K, N]`` at once."""
    g = Groups(w, config, None)
    rtn_params = choose_qparams(w, config, scale_dtype)
    best = Best(g, rtn_params.scales.astype(f32), rtn_params.zero_points, config)
    s = rtn_params.scales.astype(f32)
    z = rtn_params.zero_points.copy()
    beta = BETA
    for _ in range(ITERATIONS):
        codes = grouped_codes(g.w, s, z, config)
        residual = g.w64 - (codes.astype(f64) - z.astype(f64)[:, None, :, None]) * s.astype(f64)[:, None, :, None]
        target = g.w64 - shrink(residual, beta)
        if config.symmetric:
            fitted, zfit = fit_scale(g, codes, z, target), z
        else:
            fitted, zfit = fit_affine(g, codes, target, config)
        new_s = stored(fitted, scale_dtype)
        best.offer(new_s, zfit)
        valid = np.isfinite(new_s) & (new_s != 0)
        s = np.where(valid, new_s, s).astype(f32)
        z = np.where(valid, zfit, z).astype(np.uint8)
        beta *= KAPPA
    return against_rtn(g, best, quantize(w, config, scale_dtype=scale_dtype))


def _shrink_reference(x: float, beta: float) -> float:
    a = abs(x)
    if a == 0:
        return math.copysign(0.0, x)
    return math.copysign(max(a - (1.0 / math.sqrt(a)) / beta, 0.0), x)


def hqq_reference(weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                  stats: SiteStats | None = None) -> QuantizedWeight:
    """Slow reference: one group at a time, one element at a time (same rounds, same order)."""
    w = np.asarray(weight, dtype=f32)
    scale_dtype = np.dtype(scale_dtype)
    k, n = w.shape
    gk, gn = group_sizes(config.granularity, k, n)
    rtn = quantize_reference(w, config, scale_dtype)
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    scales, zps, codes = rtn.scales.copy(), rtn.zero_points.copy(), rtn.codes.copy()
    for r in range(rows):
        for c in range(cols):
            group = w[r * gk:(r + 1) * gk, c * gn:(c + 1) * gn]
            v = element_weights_reference(None, r * gk, group.shape[0], group.shape[1])
            s0, z0 = f32(rtn.scales[r, c]), int(rtn.zero_points[r, c])
            s, z = s0, z0
            best = BestReference(group, v, s0, z0, config)
            beta = BETA
            for _ in range(ITERATIONS):
                q = codes_reference(group, s, z, config)
                target = [[float(group[i, j]) - _shrink_reference(
                    float(group[i, j]) - (float(q[i][j]) - float(z)) * float(s), beta)
                    for j in range(group.shape[1])] for i in range(group.shape[0])]
                if config.symmetric:
                    fitted, zfit = fit_scale_reference(q, z, target, v), z
                else:
                    fitted, zfit = fit_affine_reference(q, target, v, config)
                new_s = stored_reference(fitted, scale_dtype) if math.isfinite(fitted) else f32(math.nan)
                best.offer(new_s, zfit)
                if np.isfinite(new_s) and new_s != 0:
                    s, z = new_s, zfit
                beta *= KAPPA
            rtn_q = [[int(x) for x in row] for row in rtn.codes[r * gk:(r + 1) * gk, c * gn:(c + 1) * gn]]
            if best.against_rtn(rtn_q, s0, z0):
                scales[r, c], zps[r, c] = best.scale, best.zp
                codes[r * gk:r * gk + group.shape[0], c * gn:c * gn + group.shape[1]] = np.array(best.codes)
    return QuantizedWeight(codes, scales, zps, config.bits, config.granularity, config.symmetric)


class HalfQuadratic:
    """``hqq``: the module docstring's optimisation; data-free."""

    name = "hqq"
    needs = Needs.NONE
    sequential = False

    def choose_qparams(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                       stats: SiteStats | None = None) -> QParams:
        q = self.quantize(weight, config, scale_dtype, stats)
        return QParams(q.scales, q.zero_points)

    def quantize(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 stats: SiteStats | None = None) -> QuantizedWeight:
        return hqq_quantize(weight, config, scale_dtype, stats)
