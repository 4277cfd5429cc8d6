"""ox_quant.MatMulNBits CPU kernels through ONNX Runtime, against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.packing import pack_matmulnbits, pack_zero_points
from ox_quant.errors import OxQuantError
from ox_quant.formats.custom_matmul import INT8_MAX_ROWS, custom_matmul_initializers, make_custom_matmul_node
from ox_quant.runtime.session import make_session
from tests.custom_ops_testlib import IR_VERSION, check_int8_output, check_output, make_case, save_model

M_VALUES = (1, 2, 5, 64)


pytestmark = pytest.mark.usefixtures("cpu_library")  # the shared fixture of conftest.py


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


def test_unnamed_unknown_dims_stay_unknown(tmp_path):
    """A's dims with neither value nor name must not come out as a known -1: ORT would fold
    Shape(Y) into a Reshape target with several -1s and refuse the model (seen on SmolLM2)."""
    rng = np.random.default_rng(4)
    case = make_case(rng, 64, 48, 3, 32, bias=False)
    path = save_model(case, tmp_path / "m.onnx", rank=3)
    proto = onnx.load(path)
    for value in (proto.graph.input[0], proto.graph.output[0]):
        for dim in value.type.tensor_type.shape.dim[:2]:
            dim.ClearField("dim_param")
    # Y [B, T, 48] -> Reshape(Y, [B, T, 3, -1]) with B, T read from Shape(Y)
    nodes = [helper.make_node("Shape", ["Y"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Concat", ["b", "t", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["Y", "target"], ["Z"])]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "i0"),
                                    numpy_helper.from_array(np.array([1], np.int64), "i1"),
                                    numpy_helper.from_array(np.array([3, -1], np.int64), "tail")])
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    onnx.save(proto, tmp_path / "reshape.onnx")
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    (z,) = make_session(tmp_path / "reshape.onnx", "cpu").run(None, {"A": a})
    assert z.shape == (2, 5, 3, 16)


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
    attrs = {"K": k, "N": n, "bits": bits, "block_size": bs, "accuracy_level": 0}
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
    import ox_quant.runtime.custom_ops as co

    monkeypatch.setenv("OX_QUANT_OPS_LIB", str(tmp_path / "nowhere.so"))
    monkeypatch.setattr(co, "LIB_DIR", tmp_path)
    rng = np.random.default_rng(0)
    path = save_model(make_case(rng, 32, 8, 3, 32), tmp_path / "m.onnx")
    with pytest.raises(OxQuantError, match="build-ops"):
        make_session(path, "cpu")



# ----------------------------------------------------------------------------------
# accuracy_level 4: int8 activations (M <= INT8_MAX_ROWS), float path above


def run_int8_case(case, tmp_path, m_values, seed=0, rank=2):
    sess = make_session(save_model(case, tmp_path / "m8.onnx", rank=rank, accuracy_level=4), "cpu")
    rng = np.random.default_rng(seed)
    for m in m_values:
        shape = (m, case.k) if rank == 2 else (2, m, case.k)
        a = rng.standard_normal(shape).astype(case.dtype)
        (y,) = sess.run(None, {"A": a})
        rows = int(np.prod(shape[:-1]))
        if rows <= INT8_MAX_ROWS:
            check_int8_output(case, a, y)
        else:  # large M: the float path, exact to float32 rounding
            check_output(case, a, y)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_size", [16, 20, 32, 48, 128, 100, 1000])
def test_int8_activations_bits_and_block_sizes(bits, block_size, isa, tmp_path):
    """K = 100 (not a multiple of 16, 32, 48, 128; 100 and 1000 >= K are per-channel), N = 37
    (several tasks, the 8/4/1-column kernels and the copied last columns), M = 1 and M > 1."""
    rng = np.random.default_rng(bits * 1000 + block_size + 7)
    case = make_case(rng, 100, 37, bits, block_size, zero_points=bool(block_size % 3), bias=block_size != 32)
    run_int8_case(case, tmp_path, (1, 2, 5, INT8_MAX_ROWS, INT8_MAX_ROWS + 1))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("zero_points", [True, False])
def test_int8_activations_larger(bits, zero_points, isa, tmp_path):
    """K = 1000 with block 32 (last block cut short), N = 300; large-magnitude and zero rows."""
    rng = np.random.default_rng(bits + 50)
    case = make_case(rng, 1000, 300, bits, 32, zero_points=zero_points)
    sess = make_session(save_model(case, tmp_path / "m8.onnx", accuracy_level=4), "cpu")
    a = rng.standard_normal((4, 1000)).astype(np.float32)
    a[1] *= 1e3
    a[2, :64] = 0.0  # blocks with max|a| = 0
    a[3, ::7] = 0.5  # ties after scaling are possible: round half to even on both sides
    for rows in (a[:1], a):
        (y,) = sess.run(None, {"A": rows})
        check_int8_output(case, rows, y)


@pytest.mark.parametrize("block_size", [32, 4096])
def test_int8_activations_long_blocks(block_size, isa, tmp_path):
    """8-bit codes, blocks longer than the int32 flush interval (K = 4000 per-channel)."""
    rng = np.random.default_rng(block_size)
    case = make_case(rng, 4000, 24, 8, block_size)
    run_int8_case(case, tmp_path, (1, 3))


@pytest.mark.parametrize("group", [1, 4, 7, 37])
@pytest.mark.parametrize("block_size", [100, 32])
def test_int8_activations_channel_groups(group, block_size, isa, tmp_path):
    rng = np.random.default_rng(group * 10 + block_size)
    case = make_case(rng, 100, 37, 3, block_size, group=group, zero_points=group != 4)
    run_int8_case(case, tmp_path, (1, 3))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_int8_activations_float16(bits, isa, tmp_path):
    rng = np.random.default_rng(200 + bits)
    run_int8_case(make_case(rng, 200, 45, bits, 64, dtype=np.float16), tmp_path, (1, 4, 64))
    run_int8_case(make_case(rng, 64, 40, 3, 64, group=8, dtype=np.float16), tmp_path, (1, 9))


def test_int8_activations_leading_dimensions(tmp_path):
    """A [2, M, K]: M counts all leading rows (2 * 3 = 6 <= INT8_MAX_ROWS; 2 * 5 = 10 > it)."""
    rng = np.random.default_rng(4)
    run_int8_case(make_case(rng, 64, 33, 5, 16), tmp_path, (1, 3, 5), rank=3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_activations_close_to_float_reference(bits, isa, tmp_path):
    """Against the unquantized-A float64 reference the int8 path is off by ~1e-3 (what A's
    rounding costs): check 1e-2 relative to |A| @ |W| per element and 1e-2 in norm (measured:
    5e-3 to 6e-3 in norm and <= 2.6e-4 of |A| @ |W| per element here)."""
    rng = np.random.default_rng(300 + bits)
    case = make_case(rng, 2048, 64, bits, 32)
    sess = make_session(save_model(case, tmp_path / "m8.onnx", accuracy_level=4), "cpu")
    w, mag = case.reference_w()
    for m in (1, 4):
        a = rng.standard_normal((m, 2048)).astype(np.float32)
        (y,) = sess.run(None, {"A": a})
        ref = a.astype(np.float64) @ w + case.bias
        err = np.abs(y - ref)
        assert np.all(err <= 1e-2 * (np.abs(a) @ mag) + 1e-6)
        rel = np.linalg.norm(err) / np.linalg.norm(ref - case.bias)
        assert 1e-5 < rel < 1e-2, rel  # > 1e-5: A really was quantized


def test_int8_activations_same_as_level0_for_exact_int8_inputs(tmp_path):
    """When every block of A is already integer-valued with max|a| = 127, the int8 rounding is
    exact and level 4 equals level 0 (to float32 rounding)."""
    rng = np.random.default_rng(9)
    case = make_case(rng, 256, 40, 3, 32)
    a = rng.integers(-127, 128, (2, 256)).astype(np.float32)
    a[:, ::32] = 127.0
    (y4,) = make_session(save_model(case, tmp_path / "a4.onnx", accuracy_level=4), "cpu").run(None, {"A": a})
    (y0,) = make_session(save_model(case, tmp_path / "a0.onnx", accuracy_level=0), "cpu").run(None, {"A": a})
    np.testing.assert_allclose(y4, y0, rtol=1e-5, atol=1e-3)
    check_output(case, a, y4)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_other_accuracy_levels_are_float(level, tmp_path):
    rng = np.random.default_rng(level)
    case = make_case(rng, 100, 37, 3, 32)
    sess = make_session(save_model(case, tmp_path / "m.onnx", accuracy_level=level), "cpu")
    a = rng.standard_normal((1, 100)).astype(np.float32)
    check_output(case, a, sess.run(None, {"A": a})[0])


@pytest.mark.parametrize("level", [-1, 5])
def test_bad_accuracy_level(level, tmp_path):
    path, _ = _bad_model(tmp_path, accuracy_level=level)
    with pytest.raises(OxQuantError, match="accuracy_level must be in 0..4"):
        make_session(path, "cpu")
    with pytest.raises(OxQuantError, match="accuracy_level"):
        custom_matmul_initializers(np.zeros((8, 2), np.uint8), np.ones(2), None, 3, 8, accuracy_level=level)


def test_accuracy_level_attribute_contract():
    w = custom_matmul_initializers(np.zeros((8, 2), np.uint8), np.ones(2), None, 3, 8)
    assert "accuracy_level" not in w.attributes
    w4 = custom_matmul_initializers(np.zeros((8, 2), np.uint8), np.ones(2), None, 3, 8, accuracy_level=4)
    assert w4.attributes["accuracy_level"] == 4
    node = make_custom_matmul_node("A", "Y", {"B": "b", "scales": "s"}, w.attributes, accuracy_level=0)
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 0
