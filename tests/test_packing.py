"""Packers against their slow references, and round trips."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from ox_quant.core import packing


@st.composite
def codes_and_bits(draw, max_k=80, max_n=6):
    bits = draw(st.integers(2, 8))
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(k, n)).astype(np.uint8)
    return codes, bits


@settings(max_examples=200, deadline=None)
@given(data=codes_and_bits(), block=st.sampled_from([16, 24, 32, 64, 100]))
def test_matmulnbits_pack_matches_reference_and_round_trips(data, block):
    codes, bits = data
    fast = packing.pack_matmulnbits(codes, bits, block)
    ref = packing.pack_matmulnbits_reference(codes, bits, block)
    np.testing.assert_array_equal(fast, ref)
    assert fast.shape == (codes.shape[1], -(-codes.shape[0] // block), packing.blob_size(block, bits))
    np.testing.assert_array_equal(packing.unpack_matmulnbits(fast, bits, block, codes.shape[0]), codes)


@settings(max_examples=200, deadline=None)
@given(data=codes_and_bits(max_k=40, max_n=1))
def test_bitstream_matches_reference(data):
    codes, bits = data
    flat = codes.reshape(-1)
    fast = packing.pack_bitstream(flat, bits)
    ref = packing.pack_bitstream_reference(flat, bits)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(packing.unpack_bitstream(fast, bits, flat.size), flat)
    np.testing.assert_array_equal(packing.unpack_bitstream_reference(ref, bits, flat.size), flat)


@settings(max_examples=100, deadline=None)
@given(data=codes_and_bits(max_k=20, max_n=9))
def test_zero_points_round_trip(data):
    zp, bits = data
    packed = packing.pack_zero_points(zp, bits)
    n_blocks, n = zp.shape
    assert packed.shape == (n * -(-n_blocks * bits // 8),)
    np.testing.assert_array_equal(packing.unpack_zero_points(packed, bits, n_blocks, n), zp)
    # each channel is its own bitstream, padded with the default zero point 2**(bits-1)
    row_bytes = -(-n_blocks * bits // 8)
    slots = row_bytes * 8 // bits
    row0 = np.full(slots, 1 << (bits - 1), dtype=np.uint8)
    row0[:n_blocks] = zp[:, 0]
    np.testing.assert_array_equal(packed[:row_bytes], packing.pack_bitstream_reference(row0, bits)[:row_bytes])


def test_four_bit_low_nibble_first():
    codes = np.array([[1], [2], [3]], dtype=np.uint8)  # K=3, N=1
    packed = packing.pack_matmulnbits(codes, 4, 16)
    assert packed[0, 0, 0] == 0x21 and packed[0, 0, 1] == 0x03


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(-8, 7), min_size=1, max_size=33))
def test_onnx_int4_serialisation_matches_reference(values):
    """onnx_ir's INT4 serialisation (what ox-quant writes) equals the reference packer."""
    array = np.array(values, dtype=np.int8)
    tensor = ir.Tensor(array.astype(ml_dtypes.int4), dtype=ir.DataType.INT4)
    raw = tensor.tobytes()
    assert raw == packing.pack_onnx_4bit_reference(array)
    np.testing.assert_array_equal(packing.unpack_onnx_4bit_reference(raw, len(values), signed=True), array)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 15), min_size=1, max_size=33))
def test_onnx_uint4_serialisation_matches_reference(values):
    array = np.array(values, dtype=np.uint8)
    raw = ir.Tensor(array.astype(ml_dtypes.uint4), dtype=ir.DataType.UINT4).tobytes()
    assert raw == packing.pack_onnx_4bit_reference(array)
    np.testing.assert_array_equal(packing.unpack_onnx_4bit_reference(raw, len(values), signed=False), array)
