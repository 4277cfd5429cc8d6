"""Activation quantization parameters from a calibrated range, and a float64 simulation of ONNX Q/DQ.

``uint8`` (asymmetric, ONNX Runtime's default for activations): the range is widened to hold 0,
``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, ``scale = (hi' - lo') / 255``,
``zp = clip(round(-lo' / scale), 0, 255)``.
``int8`` (symmetric): ``scale = max(|lo|, |hi|) / 127``, ``zp = 0``.
A zero range gets ``scale = 1`` (every code dequantizes to exact 0 there; never a 0 scale, which
ONNX's QuantizeLinear would divide by).

ONNX ``QuantizeLinear``: ``q = saturate(round_half_even(x / scale) + zp)``; ``DequantizeLinear``:
``(q - zp) * scale``. :func:`fake_quant` is that arithmetic in float64, broadcasting ``scale``
and ``zp`` (a scalar, or per channel along ``axis``).
"""

from __future__ import annotations

import numpy as np

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def act_qparams(lo: np.ndarray | float, hi: np.ndarray | float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scale float32, zero_point uint8|int8)`` of the same shape as ``lo``/``hi`` (module doc)."""
    lo64 = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi64 = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if dtype == "uint8":
        scale = ((hi64 - lo64) / 255.0).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        zp = np.clip(np.round(-lo64 / scale.astype(np.float64)), 0, 255).astype(np.uint8)
        return scale, zp
    if dtype == "int8":
        amax = np.maximum(np.abs(lo64), np.abs(hi64))
        scale = (amax / 127.0).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=np.int8)
    raise ValueError(f"activation dtype {dtype!r}: uint8 or int8")


def _along(a: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if a.ndim == 0 or axis is None:
        return a
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = a.size
    return a.reshape(shape)


def quantize_codes(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None = None) -> np.ndarray:
    """ONNX ``QuantizeLinear`` codes in float64 (rounding half to even, saturating)."""
    lo, hi = RANGES[dtype]
    s = _along(np.asarray(scale, np.float64), x.ndim, axis)
    z = _along(np.asarray(zp, np.float64), x.ndim, axis)
    return np.clip(np.rint(x.astype(np.float64) / s) + z, lo, hi)


def fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None = None) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(x))`` in float64."""
    s = _along(np.asarray(scale, np.float64), x.ndim, axis)
    z = _along(np.asarray(zp, np.float64), x.ndim, axis)
    return (quantize_codes(x, scale, zp, dtype, axis) - z) * s


def dynamic_qparams(x: np.ndarray) -> tuple[np.float32, np.uint8]:
    """ONNX ``DynamicQuantizeLinear``'s scale and zero point of ``x`` (uint8, range holding 0)."""
    lo = min(float(np.min(x)), 0.0)
    hi = max(float(np.max(x)), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if scale == 0:
        return np.float32(0.0), np.uint8(0)
    zp = np.uint8(np.clip(np.rint((0.0 - lo) / float(scale)), 0, 255))
    return scale, zp


def per_token_fake_quant(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 per row of the last axis, as ox-quant's per-token subgraph computes it:
    ``s = max(max|x_row| / 127, tiny)``, ``q = clip(round_half_even(x / s), -127, 127)``, ``q * s``."""
    x32 = x.astype(np.float32)
    s = np.maximum(np.max(np.abs(x32), axis=-1, keepdims=True) / np.float32(127.0), np.float32(TINY))
    return (np.clip(np.rint(x32 / s), -127, 127) * s).astype(np.float64)


TINY = 1e-30
"""Floor of a per-token scale, so an all-zero row divides by a positive number."""
