"""Streaming per-site statistics with bounded memory, and the calibration error they define.

An :class:`Accumulator` sees the activation rows ``x_r[K]`` that multiply one weight, a feed
at a time, and keeps only running sums (float64): ``sum_r x_r^2`` and ``sum_r |x_r|``
(``[K]`` each, 16 K bytes) and, when asked for, ``sum_r x_r^T x_r`` (``[K, K]``, 8 K^2 bytes).
Its state never grows with the number of feeds; a feed is folded in ``ROWS_PER_STEP`` rows at
a time, so the float64 temporaries stay at ``ROWS_PER_STEP x K``.

Calibration error of a quantized ``W'`` (:func:`output_error`): the mean squared output error
on the calibration rows relative to the mean output energy,

    ``tr(dW^T H dW) / tr(W^T H W)``,  ``dW = W' - W``, ``H = X^T X / count``,

which is ``sum_r ||x_r dW||^2 / sum_r ||x_r W||^2``. Without a Hessian, the diagonal of ``H``
(``input_sq_mean``) stands in (:func:`diagonal_error`: exact when input channels are
uncorrelated); reports say which was used.
"""

from __future__ import annotations

import numpy as np

from ox_quant.algorithms.base import SiteStats, stats_bytes
from ox_quant.errors import OxQuantError

ROWS_PER_STEP = 4096
"""Rows of a feed folded into the sums at once (bounds the float64 temporaries)."""


class Accumulator:
    """Running sums over activation rows of width ``k``; ``hessian``: also ``X^T X``."""

    def __init__(self, k: int, hessian: bool = False) -> None:
        self.k = k
        self.sum_sq = np.zeros(k, dtype=np.float64)
        self.sum_abs = np.zeros(k, dtype=np.float64)
        self.xtx = np.zeros((k, k), dtype=np.float64) if hessian else None
        self.count = 0
        self.samples = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the state: :func:`ox_quant.algorithms.base.stats_bytes`."""
        return stats_bytes(self.k, self.xtx is not None)

    def update(self, x: np.ndarray) -> None:
        """Fold in one feed's activations ``x[..., K]`` (every leading axis is a row). Raises
        ``OxQuantError`` on a width mismatch or a NaN/Inf activation."""
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.k:
            raise OxQuantError(f"activation of shape {list(x.shape)} does not end in K={self.k}")
        rows = x.reshape(-1, self.k)
        for start in range(0, rows.shape[0], ROWS_PER_STEP):
            part = rows[start:start + ROWS_PER_STEP].astype(np.float64)
            if not np.isfinite(part).all():
                raise OxQuantError("the model computes NaN or Inf activations on the calibration data")
            self.sum_sq += np.einsum("rk,rk->k", part, part)
            self.sum_abs += np.abs(part).sum(axis=0)
            if self.xtx is not None:
                self.xtx += part.T @ part
        self.count += rows.shape[0]
        self.samples += 1

    def result(self) -> SiteStats:
        """The statistics so far (``OxQuantError`` before any row)."""
        if self.count < 1:
            raise OxQuantError("no calibration rows reached this weight")
        c = float(self.count)
        hessian = None
        if self.xtx is not None:
            hessian = self.xtx / c
            hessian = (hessian + hessian.T) / 2  # exactly symmetric
        return SiteStats(self.sum_sq / c, self.count, self.sum_abs / c, hessian, self.samples)


def stats_reference(rows: np.ndarray, hessian: bool = False) -> SiteStats:
    """Slow, obvious statistics of all rows ``[count, K]`` at once (what :class:`Accumulator` is held to)."""
    x = np.asarray(rows, dtype=np.float64)
    count, k = x.shape
    sq = np.array([sum(float(x[r, j]) ** 2 for r in range(count)) / count for j in range(k)])
    ab = np.array([sum(abs(float(x[r, j])) for r in range(count)) / count for j in range(k)])
    h = None
    if hessian:
        h = np.array([[sum(float(x[r, i]) * float(x[r, j]) for r in range(count)) / count for j in range(k)]
                      for i in range(k)])
    return SiteStats(sq, count, ab, h, 1)


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW^T H dW) / tr(W^T H W)`` for ``W, W'[K, N]`` and ``H[K, K]`` (0 when ``W H W`` is 0)."""
    w = np.asarray(weight, dtype=np.float64)
    d = np.asarray(approx, dtype=np.float64) - w
    num = float(np.einsum("kn,kn->", d, hessian @ d))
    den = float(np.einsum("kn,kn->", w, hessian @ w))
    return num / den if den > 0 else 0.0


def diagonal_error(weight: np.ndarray, approx: np.ndarray, input_sq_mean: np.ndarray) -> float:
    """``sum_k E[x_k^2] sum_n dW[k, n]^2 / sum_k E[x_k^2] sum_n W[k, n]^2`` (:func:`output_error`
    with ``H`` replaced by its diagonal)."""
    w = np.asarray(weight, dtype=np.float64)
    d = np.asarray(approx, dtype=np.float64) - w
    imp = np.asarray(input_sq_mean, dtype=np.float64)
    den = float(imp @ (w * w).sum(axis=1))
    return float(imp @ (d * d).sum(axis=1)) / den if den > 0 else 0.0


def calibration_error(weight: np.ndarray, approx: np.ndarray, stats: SiteStats) -> tuple[float, str]:
    """``(error, kind)``: :func:`output_error` (kind ``"output"``) when ``stats`` has a Hessian,
    else :func:`diagonal_error` (kind ``"diagonal"``)."""
    if stats.hessian is not None:
        return output_error(weight, approx, stats.hessian), "output"
    return diagonal_error(weight, approx, stats.input_sq_mean), "diagonal"


def merge(accumulators: list[Accumulator]) -> SiteStats:
    """The statistics of all rows the accumulators saw together (a weight read by several nodes)."""
    if len(accumulators) == 1:
        return accumulators[0].result()
    first = accumulators[0]
    total = Accumulator(first.k, hessian=all(a.xtx is not None for a in accumulators))
    for acc in accumulators:
        total.sum_sq += acc.sum_sq
        total.sum_abs += acc.sum_abs
        if total.xtx is not None and acc.xtx is not None:
            total.xtx += acc.xtx
        total.count += acc.count
        total.samples = max(total.samples, acc.samples)
    return total.result()
