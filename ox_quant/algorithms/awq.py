"""AWQ: activation-aware scaling of input channels, then a clipping search, both scored by the
layer's output error on the calibration data.

With ``y = x @ W``, ``H = X^T X / count`` (``SiteStats.hessian``) and a quantized ``W'``, the
output error is ``loss(W') = tr(dW^T H dW) = ||X dW||^2 / count``, ``dW = W' - W``.

* Input scales: every weight ``W_j[K, N_j]`` reading one activation tensor ``x[..., K]`` (the
  q/k/v projections share one) shares one ``s[K]``: ``x @ W_j = (x / s) @ (diag(s) W_j)``,
  ``1/s`` folded into the op that makes ``x`` (``ox_quant.ir.input_scales``). For each ``alpha``
  of :data:`ALPHA_GRID`, ``s = max(input_abs_mean, 1e-4) ** alpha`` normalised by
  ``sqrt(max(s) * min(s))``, and ``loss = sum_j loss(diag(1/s) RTN(diag(s) W_j))``; the first
  ``alpha`` of least loss wins (``alpha = 0`` is ``s = 1``, plain RTN, so scaling never loses).
* Clipping: on the (scaled) weight, each group's range ``[lo, hi]`` is shrunk to
  ``[r lo, r hi]`` for ``r`` in :data:`CLIP_RATIOS` and the weights clipped to it before
  rounding to nearest; each group keeps the ``r`` of least ``loss`` restricted to its rows
  (``dW_g^T H_gg dW_g``, summed over its columns). The clipped result is kept only when its
  full ``loss`` is below the unclipped one's.

``*_reference`` functions loop one candidate and one group at a time with the slow RTN
reference and explicit sums; the fast ones are vectorised; tests hold them equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from ox_quant.algorithms.base import Needs, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight, quantize, quantize_reference
from ox_quant.errors import OxQuantError

ALPHA_GRID = tuple(i / 20 for i in range(20))
"""Exponents tried for ``s = input_abs_mean ** alpha`` (AWQ's grid: 0, 0.05, ..., 0.95)."""
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))
"""Range shrink factors tried per group (1.0, 0.95, ..., 0.55)."""
MIN_ACTIVATION = 1e-4
"""Floor of ``input_abs_mean`` before the power (dead channels get a finite scale)."""


def output_loss(dw: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW^T H dW)`` for ``dW[K, N]``, ``H[K, K]`` (float64)."""
    d = np.asarray(dw, dtype=np.float64)
    return float(np.sum(d * (np.asarray(hessian, dtype=np.float64) @ d)))


def candidate_scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s[K] = max(abs_mean, 1e-4) ** alpha / sqrt(max * min)`` (float64, all positive)."""
    s = np.maximum(np.asarray(abs_mean, dtype=np.float64), MIN_ACTIVATION) ** alpha
    return s / math.sqrt(float(s.max()) * float(s.min()))


def _needs(stats: SiteStats | None, what: str) -> SiteStats:
    if stats is None or stats.hessian is None or stats.input_abs_mean is None:
        raise OxQuantError(f"--algorithm awq needs calibration data (--calibration): it uses the {what}")
    return stats


# ----------------------------------------------------------------------------------
# Input scales


def _scaled_error(w: np.ndarray, s: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike,
                  rounder=quantize) -> np.ndarray:
    """``diag(1/s) RTN(diag(s) W) - W`` (float64)."""
    w64 = np.asarray(w, dtype=np.float64)
    q = rounder((w64 * s[:, None]).astype(np.float32), config, scale_dtype=scale_dtype)
    return q.dequantize() / s[:, None] - w64


def search_scales(
    weights: Sequence[np.ndarray], configs: Sequence[QuantConfig], scale_dtypes: Sequence[DTypeLike], stats: SiteStats
) -> tuple[np.ndarray, float, list[float]]:
    """``(s[K], alpha, loss per alpha)`` for the weights ``W_j[K, N_j]`` reading one input (vectorised)."""
    st = _needs(stats, "mean |activation| and the Hessian of each weight's inputs")
    assert st.hessian is not None and st.input_abs_mean is not None
    h = np.asarray(st.hessian, dtype=np.float64)
    losses = []
    for alpha in ALPHA_GRID:
        s = candidate_scales(st.input_abs_mean, alpha)
        losses.append(sum(output_loss(_scaled_error(w, s, c, d), h)
                          for w, c, d in zip(weights, configs, scale_dtypes, strict=True)))
    best = int(np.argmin(losses))
    return candidate_scales(st.input_abs_mean, ALPHA_GRID[best]), ALPHA_GRID[best], losses


def _loss_reference(dw: np.ndarray, h: np.ndarray, rows: range, cols: range) -> float:
    """``sum_{i, j in rows} H[i, j] * sum_{n in cols} dW[i, n] dW[j, n]``, one term at a time."""
    total = 0.0
    for i in rows:
        for j in rows:
            total += float(h[i, j]) * sum(float(dw[i, n]) * float(dw[j, n]) for n in cols)
    return total


def search_scales_reference(
    weights: Sequence[np.ndarray], configs: Sequence[QuantConfig], scale_dtypes: Sequence[DTypeLike], stats: SiteStats
) -> tuple[np.ndarray, float, list[float]]:
    """:func:`search_scales` with the slow RTN reference and explicit sums."""
    st = _needs(stats, "mean |activation| and the Hessian of each weight's inputs")
    assert st.hessian is not None and st.input_abs_mean is not None
    losses = []
    for alpha in ALPHA_GRID:
        s = candidate_scales(st.input_abs_mean, alpha)
        loss = 0.0
        for w, c, d in zip(weights, configs, scale_dtypes, strict=True):
            dw = _scaled_error(w, s, c, d, quantize_reference)
            loss += _loss_reference(dw, st.hessian, range(w.shape[0]), range(w.shape[1]))
        losses.append(loss)
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    return candidate_scales(st.input_abs_mean, ALPHA_GRID[best]), ALPHA_GRID[best], losses


# ----------------------------------------------------------------------------------
# Clipping


def _group_bounds(w: np.ndarray, gk: int, gn: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group ``min`` and ``max`` of ``w[K, N]``, each ``[R, C]``."""
    k, n = w.shape
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    lo = np.empty((rows, cols), dtype=w.dtype)
    hi = np.empty((rows, cols), dtype=w.dtype)
    for r in range(rows):
        block = w[r * gk : (r + 1) * gk]
        padded = np.pad(block, ((0, 0), (0, cols * gn - n)), mode="edge")
        lo[r] = padded.reshape(block.shape[0], cols, gn).min(axis=(0, 2))
        hi[r] = padded.reshape(block.shape[0], cols, gn).max(axis=(0, 2))
    return lo, hi


def _expand(per_group: np.ndarray, gk: int, gn: int, k: int, n: int) -> np.ndarray:
    return np.repeat(np.repeat(per_group, gk, axis=0)[:k], gn, axis=1)[:, :n]


def _group_losses(dw: np.ndarray, h: np.ndarray, gk: int, gn: int) -> np.ndarray:
    """``[R, C]``: each group's ``dW_g^T H_gg dW_g`` (rows of its K-range, summed over its columns)."""
    k, n = dw.shape
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    out = np.zeros((rows, cols))
    for r in range(rows):
        sl = slice(r * gk, min((r + 1) * gk, k))
        per_col = np.sum(dw[sl] * (h[sl, sl] @ dw[sl]), axis=0)
        padded = np.pad(per_col, (0, cols * gn - n))
        out[r] = padded.reshape(cols, gn).sum(axis=1)
    return out


def _keep_better(w: np.ndarray, clipped: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike,
                 h: np.ndarray, rounder=quantize) -> QuantizedWeight:
    w64 = np.asarray(w, dtype=np.float64)
    plain = rounder(np.asarray(w, dtype=np.float32), config, scale_dtype=scale_dtype)
    clip_q = rounder(clipped.astype(np.float32), config, scale_dtype=scale_dtype)
    if output_loss(clip_q.dequantize() - w64, h) < output_loss(plain.dequantize() - w64, h):
        return clip_q
    return plain


def clip_search(w: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike, hessian: np.ndarray) -> QuantizedWeight:
    """Round-to-nearest of ``w[K, N]`` after the per-group clipping search (module docstring), vectorised."""
    w32 = np.asarray(w, dtype=np.float32)
    w64 = w32.astype(np.float64)
    k, n = w32.shape
    gk, gn = config.granularity.block_shape(k, n)
    h = np.asarray(hessian, dtype=np.float64)
    lo, hi = _group_bounds(w32, gk, gn)
    best_loss = None
    best_ratio = np.ones(lo.shape)
    for ratio in CLIP_RATIOS:
        r = np.float32(ratio)
        clipped = np.clip(w32, _expand(lo * r, gk, gn, k, n), _expand(hi * r, gk, gn, k, n))
        dw = quantize(clipped, config, scale_dtype=scale_dtype).dequantize() - w64
        loss = _group_losses(dw, h, gk, gn)
        if best_loss is None:
            best_loss = loss
            continue
        better = loss < best_loss
        best_loss = np.where(better, loss, best_loss)
        best_ratio = np.where(better, ratio, best_ratio)
    r32 = best_ratio.astype(np.float32)
    clipped = np.clip(w32, _expand(lo * r32, gk, gn, k, n), _expand(hi * r32, gk, gn, k, n))
    return _keep_better(w32, clipped, config, scale_dtype, h)


def clip_search_reference(
    w: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike, hessian: np.ndarray
) -> QuantizedWeight:
    """:func:`clip_search` one group and one ratio at a time, with the slow RTN reference."""
    w32 = np.asarray(w, dtype=np.float32)
    k, n = w32.shape
    gk, gn = config.granularity.block_shape(k, n)
    h = np.asarray(hessian, dtype=np.float64)
    clipped = w32.copy()
    for r0 in range(0, k, gk):
        for c0 in range(0, n, gn):
            rows, cols = range(r0, min(r0 + gk, k)), range(c0, min(c0 + gn, n))
            group = w32[r0 : rows.stop, c0 : cols.stop]
            lo, hi = np.float32(group.min()), np.float32(group.max())
            best: tuple[float, np.ndarray] | None = None
            for ratio in CLIP_RATIOS:
                r = np.float32(ratio)
                g = np.clip(group, np.float32(lo * r), np.float32(hi * r))
                dw = np.zeros((k, n))
                dw[r0 : rows.stop, c0 : cols.stop] = (
                    quantize_reference(g, config, scale_dtype).dequantize() - group.astype(np.float64)
                )
                loss = _loss_reference(dw, h, rows, cols)
                if best is None or loss < best[0]:
                    best = (loss, g)
            assert best is not None
            clipped[r0 : rows.stop, c0 : cols.stop] = best[1]
    return _keep_better(w32, clipped, config, scale_dtype, h, quantize_reference)


# ----------------------------------------------------------------------------------
# The quantizer


class AWQ:
    """AWQ (module docstring). ``input_scales`` is the pre-quantization hook
    (``ox_quant.algorithms.base.InputScaler``) that ``convert`` calls once per activation
    tensor; ``quantize`` then gets the scaled weight and the statistics of the scaled input."""

    name = "awq"
    needs = Needs.HESSIAN
    sequential = False  # scales are searched on the float model, as AWQ does; they change no float output

    def input_scales(
        self, weights: Sequence[np.ndarray], configs: Sequence[QuantConfig], scale_dtypes: Sequence[DTypeLike],
        stats: SiteStats | None,
    ) -> np.ndarray | None:
        if stats is None or stats.hessian is None or stats.input_abs_mean is None:
            return None  # no statistics for this input: nothing to scale by
        s, alpha, _ = search_scales(weights, configs, scale_dtypes, stats)
        return None if alpha == 0 else s

    def quantize(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QuantizedWeight:
        """Clipping search on ``stats.hessian``; without one (an embedding table, a Conv, an input
        that cannot be observed) round to nearest (``convert`` refuses AWQ with no calibration at all)."""
        if stats is None or stats.hessian is None:
            return quantize(weight, config, scale_dtype=scale_dtype)
        return clip_search(weight, config, scale_dtype, stats.hessian)

    def choose_qparams(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QParams:
        q = self.quantize(weight, config, scale_dtype, stats)
        return QParams(q.scales, q.zero_points)
