"""Packing integer codes into the byte layouts ONNX Runtime reads.

Codes are unsigned integers in ``[0, 2**bits - 1]`` (uint8 arrays). Two layouts:

* **Bitstream** (MatMulNBits and ox-quant's custom ops, any bits 2..8): values are laid
  out least-significant bit first: value ``j`` occupies bits ``[j*bits, (j+1)*bits)`` of
  the stream, bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``. For 2, 4 and 8
  bits this is "low bits first" packing (value 0 in the low nibble of byte 0, ...).
* **ONNX INT4/UINT4** tensors: two values per byte, element 0 in the low nibble
  (the ONNX spec), odd-length tensors padded with a zero nibble.

Every layout has a ``*_reference`` (slow, one value at a time) and a fast vectorised
version; tests hold them to each other.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------------
# Bitstream: reference


def pack_bitstream_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a 1-D sequence of codes into ``ceil(len*bits/8)`` bytes, LSB first."""
    codes = np.asarray(codes).reshape(-1)
    out = np.zeros(math.ceil(codes.size * bits / 8), dtype=np.uint8)
    bit_pos = 0
    for value in codes.tolist():
        for b in range(bits):
            if (int(value) >> b) & 1:
                out[bit_pos // 8] |= np.uint8(1 << (bit_pos % 8))
            bit_pos += 1
    return out


def unpack_bitstream_reference(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bitstream_reference`: ``count`` codes as uint8."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    out = np.zeros(count, dtype=np.uint8)
    bit_pos = 0
    for j in range(count):
        value = 0
        for b in range(bits):
            if (int(data[bit_pos // 8]) >> (bit_pos % 8)) & 1:
                value |= 1 << b
            bit_pos += 1
        out[j] = value
    return out


# ----------------------------------------------------------------------------------
# Bitstream: fast, along the last axis


def pack_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``[..., L]`` along the last axis into ``uint8[..., ceil(L*bits/8)]``.

    Each row is packed on its own (rows start on a byte boundary).
    """
    codes = np.asarray(codes, dtype=np.uint8)
    *lead, length = codes.shape
    nbytes = math.ceil(length * bits / 8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded_len = nbytes * per_byte
        if padded_len != length:
            pad = np.zeros((*lead, padded_len - length), dtype=np.uint8)
            codes = np.concatenate([codes, pad], axis=-1)
        grouped = codes.reshape(*lead, nbytes, per_byte)
        out = np.zeros((*lead, nbytes), dtype=np.uint8)
        for i in range(per_byte):
            out |= grouped[..., i] << np.uint8(i * bits)
        return out
    # General widths (3, 5, 6, 7): expand to bits, repack 8 at a time.
    shifts = np.arange(bits, dtype=np.uint8)
    bit_array = (codes[..., None] >> shifts) & np.uint8(1)
    bit_array = bit_array.reshape(*lead, length * bits)
    return np.packbits(bit_array, axis=-1, bitorder="little")[..., :nbytes]


def unpack_bitstream(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bitstream`: ``uint8[..., B] -> uint8[..., count]``."""
    data = np.asarray(data, dtype=np.uint8)
    *lead, _ = data.shape
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        parts = [(data >> np.uint8(i * bits)) & mask for i in range(per_byte)]
        return np.stack(parts, axis=-1).reshape(*lead, -1)[..., :count]
    bit_array = np.unpackbits(data, axis=-1, bitorder="little")[..., : count * bits]
    bit_array = bit_array.reshape(*lead, count, bits)
    weights = (np.uint8(1) << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (bit_array * weights).sum(axis=-1, dtype=np.uint32).astype(np.uint8)


# ----------------------------------------------------------------------------------
# MatMulNBits layout


def blob_size(block_size: int, bits: int) -> int:
    """Bytes per packed block: ``ceil(block_size * bits / 8)``."""
    return math.ceil(block_size * bits / 8)


def pack_matmulnbits(codes: np.ndarray, bits: int, block_size: int, pad_code: int = 0) -> np.ndarray:
    """Codes ``[K, N]`` -> ``uint8[N, ceil(K/bs), blob_size]``, packed along K.

    K is padded with ``pad_code`` to whole blocks (kernels read only the first K).
    """
    k, n = codes.shape
    n_blocks = math.ceil(k / block_size)
    padded = np.full((n, n_blocks * block_size), pad_code, dtype=np.uint8)
    padded[:, :k] = codes.T
    return pack_bitstream(padded.reshape(n, n_blocks, block_size), bits)


def unpack_matmulnbits(packed: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_matmulnbits`: ``uint8[N, nb, blob] -> codes[K, N]``."""
    n, n_blocks, _ = packed.shape
    codes = unpack_bitstream(packed, bits, block_size).reshape(n, n_blocks * block_size)
    return np.ascontiguousarray(codes[:, :k].T)


def pack_matmulnbits_reference(codes: np.ndarray, bits: int, block_size: int, pad_code: int = 0) -> np.ndarray:
    """Slow reference of :func:`pack_matmulnbits` (one block at a time)."""
    k, n = codes.shape
    n_blocks = math.ceil(k / block_size)
    out = np.zeros((n, n_blocks, blob_size(block_size, bits)), dtype=np.uint8)
    for col in range(n):
        for blk in range(n_blocks):
            block = [pad_code] * block_size
            for i in range(block_size):
                row = blk * block_size + i
                if row < k:
                    block[i] = int(codes[row, col])
            out[col, blk] = pack_bitstream_reference(np.array(block), bits)
    return out


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``[n_blocks, N]`` -> MatMulNBits ``uint8[N * ceil(n_blocks*bits/8)]``.

    Each output channel's zero points are one bitstream row, padded to a whole byte with
    the default zero point ``2**(bits-1)`` (as ONNX Runtime's quantizer does).
    """
    rows = np.ascontiguousarray(np.asarray(zero_points, dtype=np.uint8).T)
    n, n_blocks = rows.shape
    slots = math.ceil(n_blocks * bits / 8) * 8 // bits
    if slots > n_blocks:
        pad = np.full((n, slots - n_blocks), 1 << (bits - 1), dtype=np.uint8)
        rows = np.concatenate([rows, pad], axis=1)
    return pack_bitstream(rows, bits).reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, n_blocks: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`: ``-> uint8[n_blocks, N]``."""
    rows = np.asarray(packed, dtype=np.uint8).reshape(n, -1)
    return np.ascontiguousarray(unpack_bitstream(rows, bits, n_blocks).T)


# ----------------------------------------------------------------------------------
# ONNX INT4 / UINT4 tensors


def pack_onnx_4bit_reference(nibbles: np.ndarray) -> bytes:
    """Raw bytes of an ONNX INT4/UINT4 tensor: element 0 in the low nibble.

    ``nibbles`` are the 4-bit two's-complement (INT4) or unsigned (UINT4) bit patterns.
    """
    flat = [int(v) & 0xF for v in np.asarray(nibbles).reshape(-1).tolist()]
    if len(flat) % 2:
        flat.append(0)
    return bytes(flat[i] | (flat[i + 1] << 4) for i in range(0, len(flat), 2))


def unpack_onnx_4bit_reference(raw: bytes, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_onnx_4bit_reference`, as int8 (signed) or uint8 values."""
    values: list[int] = []
    for byte in raw:
        values.extend((byte & 0xF, byte >> 4))
    values = values[:count]
    if signed:
        return np.array([v - 16 if v >= 8 else v for v in values], dtype=np.int8)
    return np.array(values, dtype=np.uint8)
