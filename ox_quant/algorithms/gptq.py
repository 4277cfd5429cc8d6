"""GPTQ: round the rows of ``W[K, N]`` one input channel at a time, each rounding error spread
over the rows not yet rounded so that the layer's output on the calibration data moves least.

With ``y = x @ W`` and ``H = X^T X / count`` (``SiteStats.hessian``; GPTQ's ``2 X^T X`` differs
by a factor that changes nothing below), rounding row ``j`` to ``q_j`` and moving every other
remaining row ``r`` by ``-Hinv[r, j] / Hinv[j, j] * (w_j - q_j)`` (``Hinv`` the inverse of ``H``
over the remaining rows, downdated after each row) minimises ``tr(dW^T H dW) = ||X dW||^2 / count``
for that step (optimal brain surgeon). Steps, per weight:

* dead channels (``H[k, k] == 0``: the input is always zero) get ``H[k, k] = 1`` and ``W[k] = 0``;
* act-order (optional): rows are processed by ``diag(H)`` descending (stable);
* damping: ``H += damp * mean(diag(H)) * I`` (``damp`` = 0.01);
* quantization parameters: the scale (and zero point) of a group of rows sharing one
  (``Block(B)``: ``B`` consecutive rows in the *original* K order; per-channel, per-tensor and
  channel groups: all K rows) is chosen by round-to-nearest's rule
  (:func:`ox_quant.core.quantize.choose_qparams`) on the group's current, error-updated rows
  the first time one of its rows is processed. With act-order the groups therefore stay the
  standard contiguous ones (no ``g_idx``), so every format holds the result as it holds RTN's;
* codes of a row under its group's parameters: :func:`ox_quant.core.quantize.quantize_with`.

:func:`gptq_reference` is the textbook loop: float64, one row at a time, the full inverse
Hessian downdated after each row. :func:`gptq_quantize` is the fast form (GPTQ's): the upper
Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) gives every step's update at once
(``Hinv[r, j] / Hinv[j, j] = U[j, r] / U[j, j]``), and rows are handled in blocks of 128 with
the update of the rows after a block applied as one matrix product (lazy batch). Both are
float64; they agree up to summation order (tests hold their codes and scales equal).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import DTypeLike

from ox_quant.algorithms.base import Needs, SiteStats
from ox_quant.core.config import Block, QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight, choose_qparams, quantize, quantize_with
from ox_quant.errors import OxQuantError

DEFAULT_DAMP = 0.01
"""Damping: fraction of the mean diagonal of ``H`` added to its diagonal."""
DEFAULT_BLOCK = 128
"""Rows (input channels) per lazy-batch block of the fast path."""
DAMP_RETRIES = 4
"""Times the damping is multiplied by 10 when ``H`` is still not positive definite."""


def _checked_hessian(hessian: np.ndarray, k: int) -> np.ndarray:
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise OxQuantError(f"GPTQ: the Hessian is {list(h.shape)} but the weight has K={k} input channels")
    if not np.isfinite(h).all():
        raise OxQuantError("GPTQ: the calibration Hessian holds NaN or Inf (non-finite activations)")
    return h


def _group_ranges(config: QuantConfig, k: int, n: int) -> tuple[int, int]:
    """``(gk, gn)``: rows and columns sharing one scale."""
    return config.granularity.block_shape(k, n)


def _row_codes(row: np.ndarray, scales: np.ndarray, zps: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Codes ``uint8[N]`` of one row under per-column ``scales[N]`` and ``zps[N]``."""
    row_config = replace(config, granularity=Block(1))
    return quantize_with(row[None, :], QParams(scales[None, :], zps[None, :]), row_config)[0]


def _dequantize_row(codes: np.ndarray, scales: np.ndarray, zps: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float64) - zps.astype(np.float64)) * scales.astype(np.float64)


class _GroupParams:
    """Scales and zero points of the K-groups, chosen once per group, expanded per column."""

    def __init__(self, config: QuantConfig, scale_dtype: DTypeLike, k: int, n: int):
        self.config = config
        self.scale_dtype = np.dtype(scale_dtype)
        self.gk, self.gn = _group_ranges(config, k, n)
        self.n = n
        rows = -(-k // self.gk)
        cols = -(-n // self.gn)
        self.scales = np.zeros((rows, cols), dtype=self.scale_dtype)
        self.zps = np.zeros((rows, cols), dtype=np.uint8)
        self.done = np.zeros(rows, dtype=bool)
        self.col_scales: dict[int, np.ndarray] = {}
        self.col_zps: dict[int, np.ndarray] = {}

    def members(self, g: int, k: int) -> range:
        return range(g * self.gk, min((g + 1) * self.gk, k))

    def choose(self, g: int, rows: np.ndarray) -> None:
        """Parameters of group ``g`` from its current rows ``[rows, N]`` (original order)."""
        qp = choose_qparams(rows, self.config, self.scale_dtype)
        self.scales[g] = qp.scales[0]
        self.zps[g] = qp.zero_points[0]
        self.col_scales[g] = np.repeat(qp.scales[0], self.gn)[: self.n]
        self.col_zps[g] = np.repeat(qp.zero_points[0], self.gn)[: self.n]
        self.done[g] = True

    def round_row(self, g: int, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes ``uint8[N]``, dequantized ``float64[N]``) of one row of group ``g``."""
        codes = _row_codes(row, self.col_scales[g], self.col_zps[g], self.config)
        return codes, _dequantize_row(codes, self.col_scales[g], self.col_zps[g])

    def result(self, codes: np.ndarray) -> QuantizedWeight:
        c = self.config
        return QuantizedWeight(codes, self.scales, self.zps, c.bits, c.granularity, c.symmetric)


# ----------------------------------------------------------------------------------
# Reference


def gptq_reference(
    weight: np.ndarray,
    hessian: np.ndarray,
    config: QuantConfig,
    scale_dtype: DTypeLike = np.float32,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
) -> QuantizedWeight:
    """Textbook GPTQ of ``weight[K, N]`` (module docstring): float64, one row at a time, the
    inverse Hessian of the remaining rows downdated after each (slow, obvious)."""
    w = np.array(weight, dtype=np.float64)
    k, n = w.shape
    h = _checked_hessian(hessian, k)
    for j in range(k):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[j, :] = 0.0
    order = sorted(range(k), key=lambda j: -h[j, j]) if act_order else list(range(k))
    h = h + damp * float(np.mean(np.diag(h))) * np.eye(k)
    hinv = np.linalg.inv(h)
    groups = _GroupParams(config, scale_dtype, k, n)
    codes = np.zeros((k, n), dtype=np.uint8)
    remaining = list(order)
    for j in order:
        g = j // groups.gk
        if not groups.done[g]:
            groups.choose(g, w[list(groups.members(g, k))])
        codes[j], deq = groups.round_row(g, w[j])
        delta = w[j] - deq
        remaining.remove(j)
        for r in remaining:
            w[r] -= hinv[r, j] / hinv[j, j] * delta
        w[j] = deq
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return groups.result(codes)


# ----------------------------------------------------------------------------------
# Fast


TRIANGULAR_LEAF = 256
"""Size below which a triangular inverse is left to ``np.linalg.inv``."""


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix, by halves (matrix products; a third of the work of
    a general inverse): ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``."""
    n = lower.shape[0]
    if n <= TRIANGULAR_LEAF:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    a_inv = lower_inverse(lower[:m, :m])
    d_inv = lower_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = a_inv
    out[m:, m:] = d_inv
    out[m:, :m] = -(d_inv @ (lower[m:, :m] @ a_inv))
    return out


def upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``H^-1 = U^T U`` (positive diagonal), for ``H`` positive definite.

    With ``J`` the reversal permutation and ``J H J = L L^T``: ``H^-1 = (J L^-1 J)^T (J L^-1 J)``
    and ``J L^-1 J`` is upper triangular, so one Cholesky and one triangular inverse suffice.
    Raises ``np.linalg.LinAlgError`` when ``H`` is not positive definite.
    """
    lower = np.linalg.cholesky(h[::-1, ::-1])
    inv = lower_inverse(lower)
    return np.ascontiguousarray(inv[::-1, ::-1])


def _damped_factor(h: np.ndarray, damp: float) -> np.ndarray:
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(DAMP_RETRIES + 1):
        damped = h + (damp * 10**attempt) * mean_diag * np.eye(h.shape[0])
        try:
            u = upper_inverse_cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(u).all():
            return u
    raise OxQuantError(f"GPTQ: the calibration Hessian is not positive definite even with damping "
                       f"{damp * 10**DAMP_RETRIES:g}")


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    config: QuantConfig,
    scale_dtype: DTypeLike = np.float32,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    block: int = DEFAULT_BLOCK,
) -> QuantizedWeight:
    """GPTQ of ``weight[K, N]`` with ``hessian[K, K]`` (module docstring), vectorised: the
    Cholesky form and lazy-batch blocks of ``block`` rows. Same result as :func:`gptq_reference`."""
    w = np.array(weight, dtype=np.float64)
    k, n = w.shape
    h = _checked_hessian(hessian, k)
    diag = np.diag(h).copy()
    dead = diag == 0
    h[dead, dead] = 1.0
    diag[dead] = 1.0
    w[dead] = 0.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    if act_order:
        w = w[perm]
        h = h[np.ix_(perm, perm)]
    u = _damped_factor(h, damp)
    groups = _GroupParams(config, scale_dtype, k, n)
    group_of = perm // groups.gk  # group of the row at each processing position
    positions = [np.flatnonzero(group_of == g) for g in range(groups.done.size)]
    codes = np.zeros((k, n), dtype=np.uint8)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[b0:b1]  # a view: in-block updates land in w
        err1 = np.zeros((b1 - b0, n))
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            g = int(group_of[b0 + i])
            if not groups.done[g]:
                pos = positions[g]  # every member is still unrounded (this is the first)
                current = w[pos].copy()
                later = pos >= b1  # not yet updated by this block's rows so far
                if i and later.any():
                    current[later] -= u[b0 : b0 + i, pos[later]].T @ err1[:i]
                groups.choose(g, current[np.argsort(perm[pos], kind="stable")])
            q, deq = groups.round_row(g, w1[i])
            codes[b0 + i] = q
            e = (w1[i] - deq) / u1[i, i]
            w1[i + 1 :] -= np.outer(u1[i, i + 1 :], e)
            err1[i] = e
        if b1 < k:
            w[b1:] -= u[b0:b1, b1:].T @ err1
    if act_order:
        unpermuted = np.empty_like(codes)
        unpermuted[perm] = codes
        codes = unpermuted
    return groups.result(codes)


class GPTQ:
    """GPTQ (module docstring) on the Hessian of the weight's calibration inputs, gathered on the
    model with the weights upstream already quantized (``sequential``)."""

    needs = Needs.HESSIAN
    sequential = True

    def __init__(self, name: str = "gptq", damp: float = DEFAULT_DAMP, act_order: bool = False,
                 block: int = DEFAULT_BLOCK):
        self.name = name
        self.damp = damp
        self.act_order = act_order
        self.block = block

    def quantize(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QuantizedWeight:
        """GPTQ on ``stats.hessian``; a weight without one (an embedding table, a Conv, a weight
        whose input cannot be observed) is rounded to nearest (``convert`` refuses GPTQ with no
        calibration at all)."""
        if stats is None or stats.hessian is None:
            return quantize(weight, config, scale_dtype=scale_dtype)
        return gptq_quantize(weight, stats.hessian, config, scale_dtype, self.damp, self.act_order, self.block)

    def choose_qparams(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QParams:
        q = self.quantize(weight, config, scale_dtype, stats)
        return QParams(q.scales, q.zero_points)
