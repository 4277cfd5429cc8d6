"""ox_quant.MatMulNBits CPU kernels through ONNX Runtime, against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from custom_ops_testlib import IR_VERSION, check_output, ensure_cpu_library, make_case, save_model
from ox_quant.errors import OxQuantError
from ox_quant.packing import pack_matmulnbits, pack_zero_points
from ox_quant.runtime import make_session

M_VALUES = (1, 2, 5, 64)


@pytest.fixture(scope="module", autouse=True)
def cpu_library(tmp_path_factory):
    return ensure_cpu_library(tmp_path_factory.mktemp("ops"))


@pytest.fixture(params=["default", "portable"])
def isa(request, monkeypatch):
    """Run with the fastest path for this CPU, then again with the portable C++ path."""
    if request.param == "portable":
        monkeypatch.setenv("OX_QUANT_OPS_ISA", "portable")
    else:
        monkeypatch.delenv("OX_QUANT_OPS_ISA", raising=False)
    return request.param


def run_case(case, tmp_path, m_values=M_VALUES, rank=2, seed=0):
    sess = make_session(save_model(case, tmp_path / "m.onnx", rank=rank), "cpu")
    rng = np.random.default_rng(seed)
    for m in m_values:
        shape = (m, case.k) if rank == 2 else (2, m, case.k)
        a = rng.standard_normal(shape).astype(case.dtype)
        (y,) = sess.run(None, {"A": a})
        check_output(case, a, y)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_size", [16, 20, 32, 48, 128, 100])
def test_bits_and_block_sizes(bits, block_size, isa, tmp_path):
    """K = 100: not a multiple of 16, 32, 48 or 128; 100 = K is per-channel; 20 and 48 are not powers of two."""
    rng = np.random.default_rng(bits * 1000 + block_size)
    case = make_case(rng, 100, 37, bits, block_size, zero_points=bool(block_size % 3), bias=block_size != 32)
    run_case(case, tmp_path)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("zero_points", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_larger_multithreaded(bits, zero_points, bias, isa, tmp_path):
    """Shapes big enough for several tasks per thread and the whole-block fast loops."""
    rng = np.random.default_rng(bits)
    case = make_case(rng, 512, 300, bits, 32, zero_points=zero_points, bias=bias)
    run_case(case, tmp_path, m_values=(1, 7, 33))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_float16(bits, tmp_path):
    rng = np.random.default_rng(100 + bits)
    run_case(make_case(rng, 200, 45, bits, 64, dtype=np.float16), tmp_path, m_values=(1, 4, 64))
    run_case(make_case(rng, 96, 24, bits, 96, zero_points=False, bias=False, dtype=np.float16), tmp_path, m_values=(1, 3))


@pytest.mark.parametrize("group", [1, 4, 7, 37])
@pytest.mark.parametrize("block_size", [100, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_channel_groups(group, block_size, bits, isa, tmp_path):
    """channel_group_size G: scales [ceil(N/G) * n_blocks]; G = N with block = K is per-tensor."""
    rng = np.random.default_rng(group * 10 + bits)
    case = make_case(rng, 100, 37, bits, block_size, group=group, zero_points=group != 4)
    assert case.weights.scales.size == math.ceil(37 / group) * math.ceil(100 / block_size)
    run_case(case, tmp_path)


def test_channel_groups_float16(tmp_path):
    rng = np.random.default_rng(7)
    run_case(make_case(rng, 64, 40, 3, 64, group=8, dtype=np.float16), tmp_path, m_values=(1, 9))


def test_leading_dimensions(tmp_path):
    """A [2, M, K] -> Y [2, M, N]."""
    rng = np.random.default_rng(3)
    run_case(make_case(rng, 64, 33, 5, 16), tmp_path, m_values=(1, 6), rank=3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_same_result_as_com_microsoft_matmulnbits(bits, tmp_path):
    """For 2/4/8 bits the packed inputs are exactly com.microsoft.MatMulNBits': same graph,
    other domain, same output."""
    rng = np.random.default_rng(bits)
    k, n, bs = 256, 64, 32
    case = make_case(rng, k, n, bits, bs, bias=False)
    custom = save_model(case, tmp_path / "custom.onnx")
    proto = onnx.load(custom)
    node = proto.graph.node[0]
    node.domain = "com.microsoft"
    node.attribute.append(helper.make_attribute("accuracy_level", 0))
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(proto, tmp_path / "ms.onnx")
    a = rng.standard_normal((3, k)).astype(np.float32)
    (y_custom,) = make_session(custom, "cpu").run(None, {"A": a})
    (y_ms,) = make_session(tmp_path / "ms.onnx", "cpu").run(None, {"A": a})
    np.testing.assert_allclose(y_custom, y_ms, rtol=1e-5, atol=1e-5)
    check_output(case, a, y_custom)


def _bad_model(tmp_path, **overrides):
    k, n, bits, bs = 64, 8, 3, 32
    nb = math.ceil(k / bs)
    codes = np.zeros((k, n), np.uint8)
    inits = {
        "B": pack_matmulnbits(codes, bits, bs),
        "scales": np.ones(n * nb, np.float32),
        "zp": pack_zero_points(np.zeros((nb, n), np.uint8), bits),
        "g_idx": np.zeros(k, np.int32),
    }
    attrs = {"K": k, "N": n, "bits": bits, "block_size": bs}
    inputs = ["A", "B", "scales", "zp"]
    a_shape = ["m", k]
    for key, value in overrides.items():
        if key == "a_shape":
            a_shape = value
        elif key in attrs:
            attrs[key] = value
        elif key == "inputs":
            inputs = value
        else:
            inits[key] = value
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="ox_quant", **attrs)
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, key) for key, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ox_quant", 1)],
                              ir_version=IR_VERSION)
    onnx.save(model, tmp_path / "bad.onnx")
    return tmp_path / "bad.onnx", k


@pytest.mark.parametrize("overrides, message", [
    ({"bits": 9}, "bits must be in 2..8"),
    ({"bits": 1}, "bits must be in 2..8"),
    ({"block_size": 0}, "block_size must be >= 1"),
])
def test_bad_attributes_fail_at_session_creation(overrides, message, tmp_path):
    path, _ = _bad_model(tmp_path, **overrides)
    with pytest.raises(OxQuantError, match=message):
        make_session(path, "cpu")


@pytest.mark.parametrize("overrides, message", [
    ({"scales": np.ones(3, np.float32)}, "scales has 3 elements"),
    ({"B": np.zeros(5, np.uint8)}, "B has 5 bytes"),
    ({"zp": np.zeros(1, np.uint8)}, "zero_points has 1 bytes"),
    ({"inputs": ["A", "B", "scales", "zp", "g_idx"]}, "g_idx"),
])
def test_bad_inputs_fail_at_run(overrides, message, tmp_path):
    path, k = _bad_model(tmp_path, **overrides)
    sess = make_session(path, "cpu")
    with pytest.raises(Exception, match=message):
        sess.run(None, {"A": np.zeros((1, k), np.float32)})


def test_wrong_k_in_a(tmp_path):
    path, k = _bad_model(tmp_path, a_shape=["m", "k"])
    sess = make_session(path, "cpu")
    with pytest.raises(Exception, match="last dimension must be K=64"):
        sess.run(None, {"A": np.zeros((1, k + 1), np.float32)})


def test_zero_rows(tmp_path):
    rng = np.random.default_rng(0)
    case = make_case(rng, 64, 16, 3, 32)
    sess = make_session(save_model(case, tmp_path / "m.onnx"), "cpu")
    (y,) = sess.run(None, {"A": np.zeros((0, 64), np.float32)})
    assert y.shape == (0, 16)


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    import ox_quant.custom_ops as co

    monkeypatch.setenv("OX_QUANT_OPS_LIB", str(tmp_path / "nowhere.so"))
    monkeypatch.setattr(co, "LIB_DIR", tmp_path)
    rng = np.random.default_rng(0)
    path = save_model(make_case(rng, 32, 8, 3, 32), tmp_path / "m.onnx")
    with pytest.raises(OxQuantError, match="build-ops"):
        make_session(path, "cpu")

