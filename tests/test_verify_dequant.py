"""``ox_quant.core.dequant`` against ONNX Runtime's own MatMulNBits and DequantizeLinear."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.dequant import dequantize_linear, dequantize_matmulnbits, unpack_codes


def _run(model, feeds):
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_unpack_codes_matches_a_slow_loop():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (3, 6), dtype=np.uint8)
    for bits in (2, 3, 4, 8):
        count = 6 * 8 // bits
        slow = np.zeros((3, count), dtype=np.uint8)
        for row in range(3):
            stream = "".join(format(int(b), "08b")[::-1] for b in packed[row])  # LSB first
            for i in range(count):
                slow[row, i] = int(stream[i * bits:(i + 1) * bits][::-1], 2)
        np.testing.assert_array_equal(unpack_codes(packed, bits, count), slow)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("with_zp", [False, True])
def test_matmulnbits_dequant_matches_ort(bits, with_zp):
    rng = np.random.default_rng(bits)
    k, n, block = 80, 6, 32  # K not a multiple of the block: the last block is padded
    n_blocks = math.ceil(k / block)
    b = rng.integers(0, 256, (n, n_blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, n * n_blocks).astype(np.float32)
    inputs = ["A", "B", "scales"]
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    zp = None
    if with_zp:
        zp = rng.integers(0, 256, (n, math.ceil(n_blocks * bits / 8)), dtype=np.uint8)
        inputs.append("zp")
        inits.append(numpy_helper.from_array(zp, "zp"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    expected = _run(model, {"A": np.eye(k, dtype=np.float32)})  # I @ W = W
    got = dequantize_matmulnbits(b, scales, zp, k=k, n=n, bits=bits, block_size=block)
    assert got.shape == (k, n)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


CASES = [
    ("int8 per-tensor", TensorProto.INT8, np.int8, (6, 8), (), 1, 0),
    ("uint8 per-axis", TensorProto.UINT8, np.uint8, (6, 8), (8,), 1, 0),
    ("int4 per-axis 0", TensorProto.INT4, ml_dtypes.int4, (6, 8), (6,), 0, 0),
    ("int4 blocked", TensorProto.INT4, ml_dtypes.int4, (40, 8), (3, 8), 0, 16),
    ("uint4 blocked", TensorProto.UINT4, ml_dtypes.uint4, (6, 40), (6, 3), 1, 16),
]


@pytest.mark.parametrize("label,onnx_type,np_type,shape,scale_shape,axis,block", CASES, ids=[c[0] for c in CASES])
def test_dequantize_linear_matches_ort(label, onnx_type, np_type, shape, scale_shape, axis, block):
    rng = np.random.default_rng(1)
    info = np.iinfo(np.int8 if "int8" == label[:4] else np.uint8)
    lo, hi = (info.min, info.max) if "8" in label else ((-8, 7) if label.startswith("int4") else (0, 15))
    x = rng.integers(lo, hi + 1, shape).astype(np_type)
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    zp = rng.integers(lo, hi + 1, scale_shape).astype(np_type)
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    inits = [
        helper.make_tensor("x", onnx_type, shape, x.astype(np.int32).flatten().tolist()),
        numpy_helper.from_array(scale, "s"),
        helper.make_tensor("z", onnx_type, scale_shape, zp.astype(np.int32).flatten().tolist()),
    ]
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    expected = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {})
    got = dequantize_linear(x, scale, zp, axis=axis, block_size=block)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
