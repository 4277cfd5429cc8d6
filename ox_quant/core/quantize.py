"""Round-to-nearest quantization of a weight ``W[K, N]`` for every granularity and bit width.

Formulas (``qmax = 2**bits - 1``, ``mid = 2**(bits-1)``), per group ``g`` of weights:

* symmetric:  ``zp = mid``, ``scale`` by ``config.symmetric_rule`` (:mod:`ox_quant.core.symmetric`:
  ``min-error`` by default, ``signed`` = ONNX Runtime's ``-ext / mid``, ``absmax`` =
  ``absmax(g) / (mid - 1)``), codes ``q in [0, qmax]``
* asymmetric: ``lo = min(min(g), 0)``, ``hi = max(max(g), 0)``, ``scale = (hi - lo) / qmax``,
  ``zp = clip(round(-lo / scale), 0, qmax)``, ``q = clip(round(w * (1 / scale) + zp), 0, qmax)``,
  in float32 as ONNX Runtime's blockwise quantizer computes them (``zp`` from the scale before it
  is rounded to ``scale_dtype``, codes from the stored one), so the bytes are ONNX Runtime's
* dequantized: ``w' = (q - zp) * scale``; ``|w - w'| <= |scale| / 2`` for every element under
  asymmetric and ``absmax`` (``signed`` and ``min-error`` may clip the largest weights).

A group whose range is zero gets ``scale = 0`` and codes ``zp``: it dequantizes to exact
zeros, never NaN or Inf.

Scales are rounded to ``scale_dtype`` (the activation dtype a format stores) *before* the
codes are computed, so the formulas hold for the stored scale. ``round`` is half away from
zero (C's ``roundf``, ONNX Runtime's choice): weights that are themselves on a grid (a
re-quantized Q4_1 model) hit exact ties, where half-to-even would write other codes.

:func:`quantize_reference` loops over groups one at a time (slow, obvious);
:func:`quantize` is the vectorised version held to it by tests. It is two steps, as the
quantizer seam (``ox_quant.algorithms``) needs: :func:`choose_qparams` (scales and zero
points) and :func:`quantize_with` (codes under given parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from ox_quant.core.config import Granularity, QuantConfig, SymmetricRule
from ox_quant.core.symmetric import (
    nearest_codes,
    round_half_away_into_codes,
    signed_codes,
    symmetric_fast,
    symmetric_group_reference,
)


@dataclass(frozen=True)
class QuantizedWeight:
    """The quantized form of ``W[K, N]``.

    codes:       ``uint8[K, N]``, values in ``[0, 2**bits - 1]``
    scales:      ``scale_dtype[R, C]`` with ``(R, C) = granularity.scale_shape(K, N)``
    zero_points: ``uint8[R, C]``; for symmetric configs every entry is ``2**(bits-1)``
                 (symmetric scales may be negative, see :mod:`ox_quant.core.symmetric`)
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    granularity: Granularity
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.codes.shape
        return k, n

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a ``[R, C]`` per-group array to ``[K, N]``."""
        k, n = self.shape
        return expand_groups(per_group, self.granularity, k, n)

    def dequantize(self, dtype: type = np.float64) -> np.ndarray:
        """``(q - zp) * scale`` as ``dtype[K, N]``."""
        scales = self.expand(self.scales.astype(dtype))
        zps = self.expand(self.zero_points.astype(dtype))
        return (self.codes.astype(dtype) - zps) * scales


def group_sizes(granularity: Granularity, k: int, n: int) -> tuple[int, int]:
    """``(rows, cols)`` of weights sharing one scale (the last group may be partial)."""
    return granularity.block_shape(k, n)


def expand_groups(per_group: np.ndarray, granularity: Granularity, k: int, n: int) -> np.ndarray:
    """Repeat a ``[R, C]`` per-group array so that element ``[i, j]`` is its group's value."""
    gk, gn = group_sizes(granularity, k, n)
    return np.repeat(np.repeat(per_group, gk, axis=0)[:k], gn, axis=1)[:, :n]


def round_half_away(x: np.ndarray | np.floating) -> np.ndarray:
    """``roundf``: to the nearest integer, halves away from zero, computed exactly in float64
    (``floor(|x| + 0.5)`` in float32 would round 0.49999997 up). For scalars and per-group
    arrays; weight-sized arrays use :func:`~ox_quant.core.symmetric.round_half_away_into_codes`."""
    x64 = np.asarray(x, dtype=np.float64)
    return np.copysign(np.floor(np.abs(x64) + 0.5), x64)


# ----------------------------------------------------------------------------------
# Reference


def _group_params_reference(group: np.ndarray, config: QuantConfig, scale_dtype: np.dtype) -> tuple[np.float32, int]:
    """(stored scale, zero point) of one asymmetric group, scalar arithmetic in float32."""
    f32 = np.float32
    lo = f32(min(f32(np.min(group)), f32(0)))
    hi = f32(max(f32(np.max(group)), f32(0)))
    unrounded = f32((hi - lo) / f32(config.qmax))
    scale = f32(np.asarray(unrounded, dtype=scale_dtype))
    if scale == 0:
        return f32(0), 0
    zp = int(np.clip(round_half_away(f32(-lo / unrounded)), 0, config.qmax))
    return scale, zp


def _code_reference(w: np.float32, scale: np.float32, zp: int, config: QuantConfig) -> int:
    if scale == 0:
        return zp
    with np.errstate(over="ignore"):
        inverse = np.float32(np.float32(1) / scale)
    x = np.float32(w * inverse) if np.isfinite(inverse) else np.float32(w / scale)
    r = int(round_half_away(np.float32(x + np.float32(zp))))
    return min(max(r, 0), config.qmax)


def quantize_reference(weight: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike = np.float32) -> QuantizedWeight:
    """Slow reference: one group, then one element at a time. ``weight`` is ``[K, N]``."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    gk, gn = group_sizes(config.granularity, k, n)
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    scales = np.zeros((rows, cols), dtype=scale_dtype)
    zps = np.zeros((rows, cols), dtype=np.uint8)
    codes = np.zeros((k, n), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            group = w[r * gk : (r + 1) * gk, c * gn : (c + 1) * gn]
            if config.symmetric:
                scale, group_codes = symmetric_group_reference(group, config.bits, config.symmetric_rule, np.dtype(scale_dtype))
                scales[r, c] = scale
                zps[r, c] = config.mid
                codes[r * gk : r * gk + group.shape[0], c * gn : c * gn + group.shape[1]] = group_codes
                continue
            scale, zp = _group_params_reference(group, config, np.dtype(scale_dtype))
            scales[r, c] = scale
            zps[r, c] = zp
            for i in range(group.shape[0]):
                for j in range(group.shape[1]):
                    codes[r * gk + i, c * gn + j] = _code_reference(group[i, j], scale, zp, config)
    return QuantizedWeight(codes, scales, zps, config.bits, config.granularity, config.symmetric)


# ----------------------------------------------------------------------------------
# Fast


def _grouped_view(w: np.ndarray, gk: int, gn: int) -> np.ndarray:
    """Zero-pad ``w[K, N]`` to whole groups and view it as ``[R, gk, C, gn]``.

    Zero padding changes no group's result (asymmetric ranges include 0; see
    :func:`ox_quant.core.symmetric.symmetric_fast`).
    """
    k, n = w.shape
    rows, cols = math.ceil(k / gk), math.ceil(n / gn)
    if rows * gk != k or cols * gn != n:
        w = np.pad(w, ((0, rows * gk - k), (0, cols * gn - n)))
    return w.reshape(rows, gk, cols, gn)


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of ``W[K, N]``: ``scales`` (``scale_dtype[R, C]``, as stored)
    and ``zero_points`` (``uint8[R, C]``) with ``(R, C) = granularity.scale_shape(K, N)``."""

    scales: np.ndarray
    zero_points: np.ndarray


def choose_qparams(
    weight: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike = np.float32, stats: object | None = None
) -> QParams:
    """Round-to-nearest's scales and zero points of ``weight[K, N]`` (module docstring's
    formulas, vectorised; symmetric scales by ``config.symmetric_rule``, see
    :mod:`ox_quant.core.symmetric`). ``stats`` (calibration statistics) is not used by this rule."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    gk, gn = group_sizes(config.granularity, k, n)
    grouped = _grouped_view(w, gk, gn)
    f32 = np.float32
    if config.symmetric:
        scales_f, _ = symmetric_fast(grouped, config.bits, config.symmetric_rule, np.dtype(scale_dtype))
        zps = np.full(scales_f.shape, config.mid, dtype=np.uint8)
    else:
        lo = np.minimum(grouped.min(axis=(1, 3)), f32(0))
        hi = np.maximum(grouped.max(axis=(1, 3)), f32(0))
        unrounded = ((hi - lo) / f32(config.qmax)).astype(f32)
        scales_f = unrounded.astype(scale_dtype).astype(f32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_f = np.where(scales_f > 0, round_half_away(-lo / unrounded), 0)
        zps = np.clip(zp_f, 0, config.qmax).astype(np.uint8)
    return QParams(scales_f.astype(scale_dtype), zps)


def quantize_with(weight: np.ndarray, qparams: QParams, config: QuantConfig) -> np.ndarray:
    """Codes ``uint8[K, N]`` of ``weight[K, N]`` under given scales and zero points:
    ``clip(round(w / scale) (+ zp), ...)`` as in the module docstring; a zero scale gives ``zp``.
    Symmetric scales may be negative (all 2^b levels): ``signed`` rounds as ONNX Runtime does,
    the other rules take the nearest of the ``2^b`` levels."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    gk, gn = group_sizes(config.granularity, k, n)
    grouped = _grouped_view(w, gk, gn)
    f32 = np.float32
    scales_f = qparams.scales.astype(f32)  # exact: the stored scales came from float32
    zps = qparams.zero_points
    rows, cols = scales_f.shape
    if config.symmetric:
        if config.symmetric_rule is SymmetricRule.SIGNED:
            q = signed_codes(grouped, scales_f, config.mid, config.qmax)
        else:
            q = nearest_codes(grouped, scales_f, -config.mid, config.mid - 1, config.mid)
        return np.ascontiguousarray(q.astype(np.uint8).reshape(rows * gk, cols * gn)[:k, :n])
    codes = np.empty((rows, gk, cols, gn), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(1, gk * cols * gn))  # row groups per chunk: bounded scratch
    for r0 in range(0, rows, step):
        part = slice(r0, r0 + step)
        codes[part] = _asymmetric_codes(grouped[part], scales_f[part], zps[part], config.qmax)
    return np.ascontiguousarray(codes.reshape(rows * gk, cols * gn)[:k, :n])


CHUNK_ELEMENTS = 1 << 22
"""Asymmetric codes are computed this many weights at a time (float32 scratch of 16 MiB each)."""


def _asymmetric_codes(grouped: np.ndarray, scales_f: np.ndarray, zps: np.ndarray, qmax: int) -> np.ndarray:
    """uint8 codes ``clip(roundf(w * (1 / scale) + zp), 0, qmax)`` of a ``[r, gk, C, gn]`` view
    (``zp`` where the scale is 0); a subnormal scale, whose reciprocal overflows, divides instead."""
    f32 = np.float32
    safe = np.where(scales_f > 0, scales_f, f32(1))[:, None, :, None]
    with np.errstate(over="ignore"):
        inverse = f32(1) / safe
    finite = np.isfinite(inverse)
    x = grouped * np.where(finite, inverse, f32(0))
    if not finite.all():
        np.copyto(x, grouped / safe, where=np.broadcast_to(~finite, x.shape))
    x += zps[:, None, :, None].astype(f32)
    q = round_half_away_into_codes(x, qmax)
    # zero-range groups: every code is the zero point
    q = np.where((scales_f > 0)[:, None, :, None], q, zps[:, None, :, None].astype(f32))
    return q.astype(np.uint8)


def quantize(weight: np.ndarray, config: QuantConfig, scale_dtype: DTypeLike = np.float32) -> QuantizedWeight:
    """Vectorised round-to-nearest quantization of ``weight[K, N]`` (see module docstring):
    :func:`choose_qparams` then :func:`quantize_with`; symmetric configs keep the codes their
    rule chose with each group's scale (:func:`ox_quant.core.symmetric.symmetric_fast`)."""
    if config.symmetric:
        w = np.asarray(weight, dtype=np.float32)
        k, n = w.shape
        gk, gn = group_sizes(config.granularity, k, n)
        grouped = _grouped_view(w, gk, gn)
        scales_f, q_codes = symmetric_fast(grouped, config.bits, config.symmetric_rule, np.dtype(scale_dtype))
        rows, cols = scales_f.shape
        codes = np.ascontiguousarray(q_codes.reshape(rows * gk, cols * gn)[:k, :n])
        zps = np.full(scales_f.shape, config.mid, dtype=np.uint8)
        return QuantizedWeight(codes, scales_f.astype(scale_dtype), zps, config.bits, config.granularity, True)
    qparams = choose_qparams(weight, config, scale_dtype)
    codes = quantize_with(weight, qparams, config)
    return QuantizedWeight(codes, qparams.scales, qparams.zero_points, config.bits, config.granularity, False)
