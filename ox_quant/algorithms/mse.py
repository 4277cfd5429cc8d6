"""``mse``: per-group scale (and zero point) search minimising the (importance-weighted) squared
weight error, the idea of llama.cpp's ``make_qkx2_quants`` / importance-weighted quants and
ONNX Runtime's ``k_quant``.

Per group (``ox_quant.algorithms.search`` has the shared formulas), candidates in this order,
each scale rounded to the stored dtype, codes as ``quantize_with`` computes them:

* asymmetric: for each shrink ``t`` in :data:`SHRINK`, the range ``[t lo, t hi]`` of
  round-to-nearest (``lo = min(min(g), 0)``, ``hi = max(max(g), 0)``):
  ``s = (t hi - t lo) / qmax``, ``z = clip(round_half_away(-t lo / s), 0, qmax)``; then the
  least-squares scale and integer zero point refitted to that candidate's codes;
* symmetric: ``s = t * s_rtn`` (round-to-nearest's scale under ``config.symmetric_rule``) for
  each ``t``, zero point ``mid``; then the least-squares scale refitted to its codes.

The lowest error ``sum v ((q - z) s - w)^2`` wins (ties: the earlier); ``v[k] =
input_sq_mean[k]`` when calibration statistics are given (the output error of a layer whose
inputs are uncorrelated), else 1. Finally each group keeps round-to-nearest's own result where
that is not worse, so ``mse`` is never worse than ``rtn`` on this error, group by group.

All granularities: the search is per group, whatever its shape (per-tensor is one large
group, summed by ``cumsum``). All bits 2-8. Cost: ``2 * len(SHRINK) + 1`` code passes.
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
    quantize,
    quantize_reference,
    round_half_away,
)

SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
"""Fractions of round-to-nearest's range (asymmetric) or scale (symmetric) tried."""

f32 = np.float32


def _importance(stats: SiteStats | None, k: int) -> np.ndarray | None:
    if stats is None:
        return None
    imp = np.asarray(stats.input_sq_mean, dtype=np.float64)
    return imp if imp.shape == (k,) else None


def mse_quantize(weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 stats: SiteStats | None = None) -> QuantizedWeight:
    """The search over all groups of ``weight[K, N]``, in chunks of whole column groups."""
    w = np.asarray(weight, dtype=f32)
    imp = _importance(stats, w.shape[0])
    return by_column_chunks(_mse_quantize, w, config, np.dtype(scale_dtype), imp)


def _mse_quantize(w: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 importance: np.ndarray | None) -> QuantizedWeight:
    """Vectorised search (module docstring) over all groups of ``w[K, N]`` at once."""
    g = Groups(w, config, importance)
    rtn_params = choose_qparams(w, config, scale_dtype)
    best = Best(g, rtn_params.scales.astype(f32), rtn_params.zero_points, config)
    if config.symmetric:
        base = rtn_params.scales.astype(f32)
        mid = np.full(base.shape, config.mid, dtype=np.uint8)
        for t in SHRINK:
            codes = best.offer(stored(f32(t) * base, scale_dtype), mid)
            best.offer(stored(fit_scale(g, codes, mid, g.w64), scale_dtype), mid)
    else:
        lo = np.minimum(g.w.min(axis=(1, 3)), f32(0))
        hi = np.maximum(g.w.max(axis=(1, 3)), f32(0))
        for t in SHRINK:
            lo_t, hi_t = lo * f32(t), hi * f32(t)
            unrounded = ((hi_t - lo_t) / f32(config.qmax)).astype(f32)
            s = stored(unrounded, scale_dtype)
            with np.errstate(divide="ignore", invalid="ignore"):
                zf = np.where(s > 0, round_half_away(-lo_t / unrounded), 0)
            z = np.clip(zf, 0, config.qmax).astype(np.uint8)
            codes = best.offer(np.where(s > 0, s, np.nan).astype(f32), z)
            fitted, zfit = fit_affine(g, codes, g.w64, config)
            best.offer(stored(fitted, scale_dtype), zfit)
    return against_rtn(g, best, quantize(w, config, scale_dtype=scale_dtype))


def mse_reference(weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                  stats: SiteStats | None = None) -> QuantizedWeight:
    """Slow reference: one group at a time, one element at a time (same candidates, same order)."""
    w = np.asarray(weight, dtype=f32)
    scale_dtype = np.dtype(scale_dtype)
    k, n = w.shape
    imp = _importance(stats, k)
    gk, gn = group_sizes(config.granularity, k, n)
    rtn = quantize_reference(w, config, scale_dtype)
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    scales = rtn.scales.copy()
    zps = rtn.zero_points.copy()
    codes = rtn.codes.copy()
    for r in range(rows):
        for c in range(cols):
            group = w[r * gk:(r + 1) * gk, c * gn:(c + 1) * gn]
            v = element_weights_reference(imp, r * gk, group.shape[0], group.shape[1])
            target = [[float(x) for x in row] for row in group]
            s0 = f32(rtn.scales[r, c])
            z0 = int(rtn.zero_points[r, c])
            best = BestReference(group, v, s0, z0, config)
            if config.symmetric:
                for t in SHRINK:
                    q = best.offer(stored_reference(f32(f32(t) * s0), scale_dtype), config.mid)
                    fitted = fit_scale_reference(q, config.mid, target, v)
                    best.offer(stored_reference(fitted, scale_dtype) if math.isfinite(fitted) else math.nan, config.mid)
            else:
                lo = f32(min(f32(np.min(group)), f32(0)))
                hi = f32(max(f32(np.max(group)), f32(0)))
                for t in SHRINK:
                    lo_t, hi_t = f32(lo * f32(t)), f32(hi * f32(t))
                    unrounded = f32((hi_t - lo_t) / f32(config.qmax))
                    s = stored_reference(unrounded, scale_dtype)
                    z = int(np.clip(round_half_away(f32(-lo_t / unrounded)), 0, config.qmax)) if s > 0 else 0
                    q = best.offer(s if s > 0 else math.nan, z)
                    fitted, zfit = fit_affine_reference(q, target, v, config)
                    best.offer(stored_reference(fitted, scale_dtype) if math.isfinite(fitted) else math.nan, zfit)
            rtn_q = [[int(x) for x in row] for row in rtn.codes[r * gk:(r + 1) * gk, c * gn:(c + 1) * gn]]
            if best.against_rtn(rtn_q, s0, z0):
                scales[r, c] = best.scale
                zps[r, c] = best.zp
                codes[r * gk:r * gk + group.shape[0], c * gn:c * gn + group.shape[1]] = np.array(best.codes)
    return QuantizedWeight(codes, scales, zps, config.bits, config.granularity, config.symmetric)


class MseSearch:
    """``mse``: the module docstring's search; uses ``stats.input_sq_mean`` when given."""

    name = "mse"
    needs = Needs.IMPORTANCE
    sequential = False

    def choose_qparams(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                       stats: SiteStats | None = None) -> QParams:
        q = self.quantize(weight, config, scale_dtype, stats)
        return QParams(q.scales, q.zero_points)

    def quantize(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 stats: SiteStats | None = None) -> QuantizedWeight:
        return mse_quantize(weight, config, scale_dtype, stats)
