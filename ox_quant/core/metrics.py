"""Error metrics between a reference output ``r`` and a candidate output ``c``.

All sums run over every element, in float64:

* ``max_abs_err = max|r - c|``, ``mean_abs_err = mean|r - c|``
* ``rel_l2 = ||r - c||_2 / ||r||_2``
* ``sqnr_db = 10 * log10(sum r^2 / sum (r - c)^2)`` (``inf`` when ``c == r`` exactly)
* ``cosine = <r, c> / (||r|| * ||c||)`` (1 when both are zero)

For logits-like outputs (float, rank >= 2, last axis >= 2 -- e.g. ``[B, S, vocab]``), each
row along the last axis is a prediction:

* ``argmax_agreement``: fraction of rows with ``argmax(r) == argmax(c)``;
* ``top5_agreement``: mean over rows of ``|top5(r) & top5(c)| / 5`` (last axis > 5 only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ox_quant.errors import OxQuantError


@dataclass(frozen=True)
class OutputMetrics:
    """How far one candidate output is from its reference."""

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    mean_abs_err: float
    rel_l2: float
    sqnr_db: float
    cosine: float
    argmax_agreement: float | None = None
    top5_agreement: float | None = None
    nonfinite: int = 0
    """Elements of the candidate that are NaN or infinite where the reference is finite."""


def is_logits_like(array: np.ndarray) -> bool:
    """Float, rank >= 2, with at least two classes on the last axis."""
    return array.dtype.kind == "f" and array.ndim >= 2 and array.shape[-1] >= 2


def _sqnr_db(rel_l2: float) -> float:
    """``-20 log10(rel_l2)``: the same as ``10 log10(signal / noise)`` without overflow."""
    if rel_l2 == 0.0:
        return math.inf
    if rel_l2 == math.inf:
        return -math.inf
    return -20.0 * math.log10(rel_l2)


def _topk_overlap(ref: np.ndarray, cand: np.ndarray, k: int) -> float:
    rows_r = ref.reshape(-1, ref.shape[-1])
    rows_c = cand.reshape(-1, cand.shape[-1])
    top_r = np.argsort(-rows_r, axis=-1, kind="stable")[:, :k]
    top_c = np.argsort(-rows_c, axis=-1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_c[:, None, :]).any(axis=-1).sum(axis=-1)
    return float(hits.mean() / k)


def compare(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputMetrics:
    """Metrics of ``cand`` against ``ref`` (same shape; any numeric or bool dtype)."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        raise OxQuantError(f"output {name!r}: reference shape {ref.shape} != candidate shape {cand.shape}")
    r = ref.astype(np.float64).ravel()
    c = cand.astype(np.float64).ravel()
    nonfinite = int(np.count_nonzero(np.isfinite(r) & ~np.isfinite(c)))
    diff = r - c
    if r.size == 0:
        return OutputMetrics(name, tuple(ref.shape), 0.0, 0.0, 0.0, math.inf, 1.0, nonfinite=0)
    signal = float(np.dot(r, r))
    noise = float(np.dot(diff, diff))
    norm_r, norm_c = math.sqrt(signal), math.sqrt(float(np.dot(c, c)))
    if norm_r == 0.0 and norm_c == 0.0:
        cosine = 1.0
    elif norm_r == 0.0 or norm_c == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r, c)) / (norm_r * norm_c)
    if signal == 0.0:
        rel_l2 = 0.0 if noise == 0.0 else math.inf
    else:
        rel_l2 = math.sqrt(noise) / norm_r
    absdiff = np.abs(diff)
    argmax_agreement = top5_agreement = None
    if is_logits_like(ref):
        rows_r = ref.reshape(-1, ref.shape[-1])
        rows_c = cand.reshape(-1, cand.shape[-1])
        argmax_agreement = float(np.mean(rows_r.argmax(-1) == rows_c.argmax(-1)))
        if ref.shape[-1] > 5:
            top5_agreement = _topk_overlap(ref, cand, 5)
    return OutputMetrics(
        name=name,
        shape=tuple(int(d) for d in ref.shape),
        max_abs_err=float(absdiff.max()),
        mean_abs_err=float(absdiff.mean()),
        rel_l2=rel_l2,
        sqnr_db=_sqnr_db(rel_l2),
        cosine=cosine,
        argmax_agreement=argmax_agreement,
        top5_agreement=top5_agreement,
        nonfinite=nonfinite,
    )
