"""Activation range calibrators: min-max, percentile, entropy (KL) and MSE, streaming in bounded memory.

An activation tensor ``x`` (any shape) is seen batch after batch. :class:`RangeStats` keeps
its exact ``min``/``max`` and a histogram of ``|x|`` with a fixed number of bins ``B`` over
``[0, R]``; when a batch exceeds ``R`` the range doubles (``R -> 2R``) and adjacent bins are
summed pairwise, so memory stays ``B`` counts whatever the data, and the histogram equals
``np.histogram(|x_all|, B, (0, R_final))`` exactly (bin ``i`` holds
``i * R/B <= |x| < (i+1) * R/B``; ``R`` is a power of two above every value seen, and grows by
doubling, so every final edge is an earlier edge and no value sits on the top edge).

Each calibrator returns a threshold ``T`` on ``|x|``; the range handed to the quantizer is
``lo = max(min, -T)``, ``hi = min(max, T)`` (:func:`clipped_range`). With ``qlevels`` the number
of positive levels of the target code (128 for int8), the thresholds are:

* ``minmax``:        ``T = max|x|`` (no clipping).
* ``percentile:P``:  the upper edge of the first bin where the cumulative count reaches
  ``P/100 * n`` (within one bin above the exact ``P``-th percentile of ``|x|``, inverted CDF).
* ``entropy``:       (per side of zero, :func:`calibrated_range`) TensorRT's KL search on the histogram with bin 0 set to bin 1's count (the
  exact zeros after a ReLU would otherwise dominate, and merging them with their neighbours makes
  every wide threshold look bad: measured, CER 1.0 on PP-OCR; NVIDIA's pytorch-quantization does
  the same): for ``i = qlevels .. B``, ``p`` = the first ``i`` bins
  with the tail counts added to bin ``i-1``; ``q`` = the first ``i`` bins (without the tail)
  merged into ``qlevels`` groups, each group's total spread evenly over the bins where ``p`` is
  non-zero; where ``q`` is then 0 and ``p`` is not, ``q = SMOOTH_EPS * sum(q)`` (a lone outlier
  does not make every clipping candidate infinite); ``T = i * R/B`` for the ``i`` of least ``KL(p || q)``
  (first on ties), raised where needed to the first ``i`` that clips at most ``ENTROPY_MAX_CLIPPED``
  of the side's values (``sum(hist[i:]) <= 1e-3 * sum(hist)``): spiky histograms (constant
  regions such as padding give a few heavily filled bins) make every wide candidate look bad
  to KL, and the bare search then clipped up to 24 % of a tensor (measured: PP-OCR CER 0.49,
  with the guard 0.0029 = fp32).
* ``mse``:           ``T = j * R/B`` (``j = 1..B``) of least expected squared error of
  symmetric rounding to step ``s = T/(qlevels - 1)``, over bin centres ``c`` with weights
  ``hist``: ``err(c) = (c - s*round(c/s))**2`` for ``c <= T``, ``(c - T)**2`` above; for a
  ``uint8`` code ``s = (min(max, T) - max(min, -T)) / 255``, the step it really has.

``*_reference`` functions are the slow, obvious forms (loops, all data in memory) the fast
ones are held to by tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ox_quant.errors import OxQuantError

DEFAULT_BINS = 2048
INT8_LEVELS = 128
SMOOTH_EPS = 1e-4
"""Where ``q`` is 0 but ``p`` is not, ``q`` takes ``SMOOTH_EPS * sum(q)`` (then renormalised): KL stays finite."""
ENTROPY_MAX_CLIPPED = 1e-3
"""The entropy threshold clips at most this fraction of the values it is searched on."""
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class Calibrator:
    """A parsed ``--calibrate`` value: ``method`` and, for ``percentile``, ``percentile`` in (0, 100]."""

    method: str = "minmax"
    percentile: float = 99.999

    def __str__(self) -> str:
        return f"percentile:{self.percentile:g}" if self.method == "percentile" else self.method


def parse_calibrator(text: str) -> Calibrator:
    """``minmax``, ``percentile[:P]`` (default 99.999), ``entropy`` or ``mse``."""
    method, _, arg = text.strip().lower().partition(":")
    if method not in METHODS:
        raise OxQuantError(f"unknown calibrator {text!r}: use minmax, percentile:P, entropy or mse")
    if method != "percentile":
        if arg:
            raise OxQuantError(f"calibrator {method} takes no argument (got {text!r})")
        return Calibrator(method)
    if not arg:
        return Calibrator("percentile")
    try:
        p = float(arg)
    except ValueError:
        raise OxQuantError(f"calibrator {text!r}: percentile {arg!r} is not a number") from None
    if not 0 < p <= 100:
        raise OxQuantError(f"calibrator {text!r}: percentile must be in (0, 100]")
    return Calibrator("percentile", p)


class RangeStats:
    """Streaming ``min``, ``max``, ``count`` and a ``bins``-bin histogram of ``|x|`` (see module doc)."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 2")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        """The part of ``hist`` from negative values (``hist - neg`` is the ``x >= 0`` side)."""
        self.range = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (finite; checked by the caller)."""
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        if a.size == 0:
            return
        xf = np.asarray(x)
        self.min = min(self.min, float(xf.min()))
        self.max = max(self.max, float(xf.max()))
        self.count += a.size
        top = float(a.max())
        if self.range == 0.0:
            if top == 0.0:
                self.hist[0] += a.size
                return
            self.range = 2.0 ** (math.floor(math.log2(top)) + 1)  # a power of two above every value
        while top >= self.range:
            self.hist = _halved(self.hist)
            self.neg = _halved(self.neg)
            self.range *= 2.0
        self.hist += binned(a, self.range, self.bins)
        negative = xf.ravel() < 0
        if negative.any():
            self.neg += binned(a[negative], self.range, self.bins)

    @property
    def width(self) -> float:
        return self.range / self.bins


def _halved(hist: np.ndarray) -> np.ndarray:
    """Adjacent bins summed pairwise, zeros appended: the histogram over a doubled range."""
    return np.concatenate([hist.reshape(-1, 2).sum(axis=1), np.zeros(len(hist) // 2, dtype=np.int64)])


def binned(a: np.ndarray, r: float, bins: int) -> np.ndarray:
    """Counts of ``a >= 0`` in ``bins`` bins over ``[0, r]``: bin ``floor(a / (r/bins))``, ``a == r`` in the last."""
    idx = np.minimum(np.floor(a / (r / bins)).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins).astype(np.int64)


def clipped_range(stats: RangeStats, threshold: float) -> tuple[float, float]:
    """``(max(min, -T), min(max, T))``: the range a threshold on ``|x|`` leaves."""
    return max(stats.min, -threshold), min(stats.max, threshold)


def threshold(stats: RangeStats, calibrator: Calibrator, qlevels: int = INT8_LEVELS) -> float:
    """``T`` for ``calibrator`` on ``stats`` (module doc); 0 for all-zero data."""
    if stats.count == 0:
        raise OxQuantError("no calibration values were seen")
    if stats.range == 0.0:
        return 0.0
    if calibrator.method == "minmax":
        return max(abs(stats.min), abs(stats.max))
    if calibrator.method == "percentile":
        return percentile_threshold(stats.hist, stats.width, calibrator.percentile)
    if calibrator.method == "entropy":
        return entropy_threshold(stats.hist, stats.width, qlevels)
    return mse_threshold(stats.hist, stats.width, qlevels)


def calibrated_range(stats: RangeStats, calibrator: Calibrator, dtype: str = "uint8") -> tuple[float, float]:
    """``(lo, hi)`` handed to the quantizer of code ``dtype`` (``uint8`` or ``int8``).

    ``entropy`` searches each side of zero on its own histogram (``hist - neg`` for ``x >= 0``,
    ``neg`` for ``x < 0``), as TensorRT and ONNX Runtime search the signed range: a mass of small
    negatives (Hardswish, GELU) must not pull the positive threshold in. A side's level count is
    the code's: one-sided data (``min >= 0``) in ``uint8`` has 256 levels, otherwise each side 128.
    ``mse`` in ``uint8`` models the step the code really has, ``(min(max, T) - max(min, -T)) / 255``
    (256 levels over the clipped range; ``T / 255`` for one-sided data), not int8's ``T / 127``,
    which overstates rounding error on lopsided data and clips too much. The other cases threshold ``|x|`` (:func:`threshold`, :func:`clipped_range`).
    """
    if stats.count and stats.range and calibrator.method == "mse" and dtype == "uint8":
        t = mse_threshold(stats.hist, stats.width, INT8_LEVELS, span=(stats.min, stats.max))
        return clipped_range(stats, t)
    if calibrator.method != "entropy" or stats.count == 0 or stats.range == 0.0:
        return clipped_range(stats, threshold(stats, calibrator, INT8_LEVELS))
    pos = stats.hist - stats.neg
    if stats.min >= 0:
        levels = 2 * INT8_LEVELS if dtype == "uint8" else INT8_LEVELS
        return stats.min, min(stats.max, entropy_threshold(pos, stats.width, levels))
    hi = min(stats.max, entropy_threshold(pos, stats.width, INT8_LEVELS)) if stats.max > 0 else stats.max
    return max(stats.min, -entropy_threshold(stats.neg, stats.width, INT8_LEVELS)), hi


def entropy_range_reference(values: np.ndarray, bins: int = DEFAULT_BINS, dtype: str = "uint8") -> tuple[float, float]:
    """:func:`calibrated_range` for ``entropy`` from all values at once: each side's ``np.histogram``
    over ``[0, R]`` (``R`` the power of two above ``max|x|``) and :func:`entropy_threshold_reference`."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    top = float(np.abs(v).max())
    if top == 0.0:
        return lo, hi
    r = 2.0 ** (math.floor(math.log2(top)) + 1)
    width = r / bins

    def hist(side: np.ndarray) -> np.ndarray:
        return np.array([int(np.sum(np.minimum(np.floor(side / width), bins - 1) == b)) for b in range(bins)])

    pos, neg = hist(v[v >= 0]), hist(-v[v < 0])
    if lo >= 0:
        levels = 2 * INT8_LEVELS if dtype == "uint8" else INT8_LEVELS
        return lo, min(hi, entropy_threshold_reference(pos, width, levels))
    new_hi = min(hi, entropy_threshold_reference(pos, width, INT8_LEVELS)) if hi > 0 else hi
    return max(lo, -entropy_threshold_reference(neg, width, INT8_LEVELS)), new_hi


# ------------------------------------------------------------------------------ percentile


def percentile_threshold(hist: np.ndarray, width: float, p: float) -> float:
    """Upper edge of the first bin whose cumulative count reaches ``p/100`` of the total."""
    cum = np.cumsum(hist)
    need = p / 100.0 * cum[-1]
    i = int(np.searchsorted(cum, need, side="left"))
    return (min(i, len(hist) - 1) + 1) * width


def percentile_reference(values: np.ndarray, p: float) -> float:
    """The smallest ``|x|`` whose empirical CDF reaches ``p/100``, over all values at once."""
    return float(np.percentile(np.abs(values.astype(np.float64)), p, method="inverted_cdf"))


# ------------------------------------------------------------------------------ entropy


def _kl_candidate_reference(hist: np.ndarray, i: int, qlevels: int) -> float:
    """KL(p || q) of candidate ``i`` (module doc), one bin at a time."""
    p = [float(v) for v in hist[:i]]
    p[i - 1] += float(sum(hist[i:]))
    q = [0.0] * i
    for g in range(qlevels):
        start = g * i // qlevels
        stop = (g + 1) * i // qlevels
        total = sum(float(hist[j]) for j in range(start, stop))
        nonzero = [j for j in range(start, stop) if p[j] != 0]
        for j in nonzero:
            q[j] = total / len(nonzero)
    psum, qsum = sum(p), sum(q)
    if psum == 0 or qsum == 0:
        return math.inf
    q = [SMOOTH_EPS * qsum if qj == 0 and pj != 0 else qj for pj, qj in zip(p, q, strict=True)]
    qsum = sum(q)
    return sum((pj / psum) * math.log((pj / psum) / (qj / qsum)) for pj, qj in zip(p, q, strict=True) if pj != 0)


def _without_zero_spike(hist: np.ndarray) -> np.ndarray:
    """The histogram with bin 0 given bin 1's count (module doc: the ReLU zero spike)."""
    out = np.array(hist, copy=True)
    if out.size > 1:
        out[0] = out[1]
    return out


def entropy_threshold_reference(hist: np.ndarray, width: float, qlevels: int = INT8_LEVELS) -> float:
    """The entropy threshold by looping over candidates and bins (slow)."""
    counts = [float(v) for v in hist]
    spikeless = _without_zero_spike(hist)
    best_i, best = len(hist), math.inf
    for i in range(qlevels, len(hist) + 1):
        kl = _kl_candidate_reference(spikeless, i, qlevels)
        if kl < best:
            best_i, best = i, kl
    while best_i < len(counts) and sum(counts[best_i:]) > ENTROPY_MAX_CLIPPED * sum(counts):
        best_i += 1
    return best_i * width


def entropy_threshold(hist: np.ndarray, width: float, qlevels: int = INT8_LEVELS) -> float:
    """The entropy threshold, each candidate vectorised over its bins."""
    h = _without_zero_spike(hist).astype(np.float64)
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
    best_i, best = len(h), math.inf
    for i in range(qlevels, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += tail[i]
        # bin j is in group g iff g*i//q <= j < (g+1)*i//q (the reference's bounds)
        groups = np.searchsorted((np.arange(1, qlevels + 1) * i) // qlevels, np.arange(i), side="right")
        nz = p != 0
        totals = np.bincount(groups, weights=h[:i], minlength=qlevels)
        counts = np.bincount(groups, weights=nz.astype(np.float64), minlength=qlevels)
        q = np.where(nz, totals[groups] / np.maximum(counts[groups], 1), 0.0)
        psum, qsum = p.sum(), q.sum()
        if psum == 0 or qsum == 0:
            continue
        q = np.where((q == 0) & nz, SMOOTH_EPS * qsum, q)
        qsum = q.sum()
        pn, qn = p[nz] / psum, q[nz] / qsum
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best_i, best = i, kl
    return max(best_i, _least_unclipping_bin(hist)) * width


def _least_unclipping_bin(hist: np.ndarray) -> int:
    """The first ``i`` with ``sum(hist[i:]) <= ENTROPY_MAX_CLIPPED * sum(hist)``."""
    counts = np.asarray(hist, dtype=np.float64)
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:]), non-increasing
    return int(np.argmax(tail <= ENTROPY_MAX_CLIPPED * tail[0]))


# ------------------------------------------------------------------------------ mse


def _step(t: float, qlevels: int, span: tuple[float, float] | None) -> float:
    """``t / (qlevels - 1)`` (symmetric), or with ``span = (min, max)`` the uint8 step of the clipped range."""
    if span is None:
        return t / (qlevels - 1)
    return (min(span[1], t) - max(span[0], -t)) / 255.0


def _sq_error(c: float, t: float, qlevels: int, span: tuple[float, float] | None = None) -> float:
    if t <= 0:
        return c * c
    if c > t:
        return (c - t) ** 2
    s = _step(t, qlevels, span)
    ratio = c / s if s > 0 else math.inf
    if not math.isfinite(ratio):  # no step, or one so small (a subnormal span) that c/s overflows: all at 0
        return c * c
    return (c - s * math.floor(ratio + 0.5)) ** 2


def mse_error(hist: np.ndarray, width: float, t: float, qlevels: int = INT8_LEVELS,
              span: tuple[float, float] | None = None) -> float:
    """Expected squared error (times the count) of threshold ``t`` over the histogram."""
    return sum(float(hist[b]) * _sq_error((b + 0.5) * width, t, qlevels, span) for b in range(len(hist)) if hist[b])


def kl_divergence(hist: np.ndarray, width: float, t: float, qlevels: int = INT8_LEVELS) -> float:
    """KL(p || q) of the entropy candidate at threshold ``t`` (``t / width`` bins)."""
    return _kl_candidate_reference(hist, round(t / width), qlevels)


def mse_threshold_reference(hist: np.ndarray, width: float, qlevels: int = INT8_LEVELS,
                            span: tuple[float, float] | None = None) -> float:
    """The MSE threshold by looping over candidates ``j * width`` and bins (slow)."""
    best_t, best = len(hist) * width, math.inf
    for j in range(1, len(hist) + 1):
        t = j * width
        err = mse_error(hist, width, t, qlevels, span)
        if err < best:
            best_t, best = t, err
    return best_t


def mse_threshold(hist: np.ndarray, width: float, qlevels: int = INT8_LEVELS, chunk: int = 256,
                  span: tuple[float, float] | None = None) -> float:
    """The MSE threshold, vectorised over (candidates x non-empty bins) in chunks (``span``: :func:`_step`)."""
    nz = np.nonzero(hist)[0]
    c = (nz + 0.5) * width
    w = hist[nz].astype(np.float64)
    n = len(hist)
    errors = np.empty(n)
    for start in range(0, n, chunk):
        t = (np.arange(start + 1, min(start + chunk, n) + 1) * width)[:, None]
        s = t / (qlevels - 1) if span is None else (np.minimum(span[1], t) - np.maximum(span[0], -t)) / 255.0
        safe = np.where(s > 0, s, 1.0)
        with np.errstate(over="ignore"):
            ratio = c[None, :] / safe
        usable = (s > 0) & np.isfinite(ratio)
        inside = np.where(usable, (c[None, :] - safe * np.floor(np.where(usable, ratio, 0.0) + 0.5)) ** 2, c[None, :] ** 2)
        err = np.where(c[None, :] > t, (c[None, :] - t) ** 2, inside)
        errors[start:start + t.shape[0]] = err @ w
    return (int(np.argmin(errors)) + 1) * width
