"""Dequantizing stored weights back to float, in numpy, the way ONNX Runtime reads them.

Two formats:

``com.microsoft.MatMulNBits`` (``Y = A @ W``, ``A: [..., K]``, ``W: [K, N]``)
    * ``B: uint8 [N, n_blocks, blob]`` with ``n_blocks = ceil(K / block_size)`` and
      ``blob = block_size * bits / 8``: the codes of one output channel, ``block_size``
      at a time along K, packed into bytes low bits first (for 4 bits: element ``2j`` in
      the low nibble of byte ``j``, element ``2j+1`` in the high nibble).
    * ``scales: [N * n_blocks]`` (or ``[N, n_blocks]``), in the activation dtype.
    * ``zero_points`` (optional): ``uint8 [N, ceil(n_blocks * bits / 8)]``, packed the same
      way along the block axis; absent means ``2**(bits-1)`` for every block.
    * ``W[k, n] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]``

``DequantizeLinear`` (opset 21+), on INT4 / UINT4 / INT8 / UINT8 (any integer) ``x``
    * per-tensor: scalar ``scale`` (and ``zero_point``);
    * per-axis: 1-D ``scale`` of length ``x.shape[axis]``;
    * blocked: ``scale`` of ``x``'s rank with ``scale.shape[axis] = ceil(x.shape[axis] /
      block_size)``; element ``i`` along ``axis`` uses scale ``i // block_size``.
    * ``y = (x - zero_point) * scale``, in the dtype of ``scale``.
"""

from __future__ import annotations

import math

import numpy as np

from ox_quant.core.packing import unpack_bitstream
from ox_quant.errors import OxQuantError


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes from bytes, low bits first, along the last axis.

    ``packed: uint8 [..., nbytes] -> uint8 [..., count]`` with ``count * bits <= 8 * nbytes``.
    The bytes form one little-endian bit stream; for 2, 4 and 8 bits this is the
    per-byte layout MatMulNBits uses (no code straddles a byte).
    """
    if not 1 <= bits <= 8:
        raise OxQuantError(f"cannot unpack {bits}-bit codes")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if count * bits > 8 * packed.shape[-1]:
        raise OxQuantError(f"{packed.shape[-1]} bytes cannot hold {count} codes of {bits} bits")
    return unpack_bitstream(packed, bits, count)


def dequantize_matmulnbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The float weight ``W: [K, N]`` that a MatMulNBits node multiplies by (see module doc).

    Returned in the dtype of ``scales``; arithmetic in float32.
    """
    n_blocks = math.ceil(k / block_size)
    blob = block_size * bits // 8
    if b.dtype != np.uint8 or b.size != n * n_blocks * blob:
        raise OxQuantError(
            f"MatMulNBits B must be uint8 [{n}, {n_blocks}, {blob}], got {b.dtype} {list(b.shape)}"
        )
    if scales.size != n * n_blocks:
        raise OxQuantError(f"MatMulNBits scales must hold {n}*{n_blocks} values, got {scales.size}")
    codes = unpack_codes(b.reshape(n, n_blocks * blob), bits, n_blocks * block_size)[:, :k]
    scale = scales.reshape(n, n_blocks).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zp_bytes = math.ceil(n_blocks * bits / 8)
        if zero_points.size != n * zp_bytes:
            raise OxQuantError(f"MatMulNBits zero points must be uint8 [{n}, {zp_bytes}], got {list(zero_points.shape)}")
        zp = unpack_codes(zero_points.reshape(n, zp_bytes), bits, n_blocks).astype(np.float32)
    else:
        raise OxQuantError(f"MatMulNBits zero points of dtype {zero_points.dtype} are not supported (only packed uint8)")
    block_of_k = np.arange(k) // block_size
    w_nk = (codes.astype(np.float32) - zp[:, block_of_k]) * scale[:, block_of_k]
    return np.ascontiguousarray(w_nk.T).astype(scales.dtype, copy=False)


def _expand_blocks(param: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    return np.repeat(param, block_size, axis=axis).take(np.arange(length), axis=axis)


def dequantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(x - zero_point) * scale`` broadcast per tensor, per
    axis or per block (see module doc). ``x`` may be an ml_dtypes int4/uint4 array."""
    x = np.asarray(x)
    scale = np.asarray(scale)
    axis = axis + x.ndim if axis < 0 else axis
    xf = x.astype(np.float32)
    sf = scale.astype(np.float32)
    zf = np.zeros_like(sf) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    if zf.shape != sf.shape:
        raise OxQuantError(f"DequantizeLinear zero point shape {zf.shape} != scale shape {sf.shape}")
    if sf.size == 1 and block_size == 0:
        y = (xf - zf.reshape(())) * sf.reshape(())
    elif block_size == 0:
        if sf.ndim != 1 or sf.shape[0] != x.shape[axis]:
            raise OxQuantError(f"DequantizeLinear per-axis scale {sf.shape} does not match axis {axis} of {x.shape}")
        shape = [1] * x.ndim
        shape[axis] = -1
        y = (xf - zf.reshape(shape)) * sf.reshape(shape)
    else:
        expected = list(x.shape)
        expected[axis] = math.ceil(x.shape[axis] / block_size)
        if list(sf.shape) != expected:
            raise OxQuantError(f"DequantizeLinear blocked scale {list(sf.shape)} != {expected}")
        y = (xf - _expand_blocks(zf, axis, block_size, x.shape[axis])) * _expand_blocks(
            sf, axis, block_size, x.shape[axis]
        )
    return y.astype(scale.dtype, copy=False)
