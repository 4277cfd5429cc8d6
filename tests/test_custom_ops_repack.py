"""accuracy_level 4 with weights repacked at kernel creation (B, scales, zero points constant
initializers) against the same node with B fed as a graph input (no repack: the kernel reads the
op's packed format every run). Both must give bit-identical outputs, and both match the exact
int8-activation reference."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.formats.custom_matmul import INT8_MAX_ROWS, make_custom_matmul_node
from ox_quant.runtime.session import make_session
from tests.custom_ops_testlib import IR_VERSION, check_int8_output, make_case

pytestmark = pytest.mark.usefixtures("cpu_library")  # the shared fixture of conftest.py


def _lib(path):
    lib = ctypes.CDLL(str(path))  # same handle as the one ONNX Runtime loaded: shared counters
    lib.OxQuantOpsRepackedRuns.restype = ctypes.c_uint64
    lib.OxQuantOpsCpuIsa.restype = ctypes.c_char_p
    return lib


def _model(case, path, b_as_input: bool):
    """accuracy_level 4 node; B an initializer, or (b_as_input) a graph input."""
    elem = TensorProto.FLOAT if case.dtype == np.float32 else TensorProto.FLOAT16
    inputs = dict(case.weights.inputs)
    b = inputs["B"]
    inits = [numpy_helper.from_array(v, key) for key, v in inputs.items() if not (b_as_input and key == "B")]
    if case.bias is not None:
        inits.append(numpy_helper.from_array(case.bias, "bias"))
    node = make_custom_matmul_node("A", "Y", {key: key for key in inputs}, case.weights.attributes,
                                   bias="bias" if case.bias is not None else None, accuracy_level=4)
    graph_inputs = [helper.make_tensor_value_info("A", elem, ["m", case.k])]
    if b_as_input:
        graph_inputs.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(b.shape)))
    graph = helper.make_graph([node], "repack", graph_inputs, [helper.make_tensor_value_info("Y", elem, ["m", case.n])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ox_quant", 1)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def compare(case, tmp_path, m_values, lib, seed=0, expect_repack=True):
    const = make_session(_model(case, tmp_path / "const.onnx", False), "cpu")
    fed = make_session(_model(case, tmp_path / "fed.onnx", True), "cpu")
    rng = np.random.default_rng(seed)
    avx2 = lib.OxQuantOpsCpuIsa() == b"avx2"
    for m in m_values:
        a = rng.standard_normal((m, case.k)).astype(case.dtype)
        a[0, : min(case.k, 40)] *= 1e3  # large first blocks
        before = lib.OxQuantOpsRepackedRuns()
        (y_const,) = const.run(None, {"A": a})
        used = lib.OxQuantOpsRepackedRuns() - before
        before = lib.OxQuantOpsRepackedRuns()
        (y_fed,) = fed.run(None, {"A": a, "B": case.weights.inputs["B"]})
        assert lib.OxQuantOpsRepackedRuns() == before, "B fed as a graph input must not use the repacked path"
        assert used == (1 if expect_repack and avx2 and m <= INT8_MAX_ROWS else 0)
        np.testing.assert_array_equal(y_const, y_fed)
        if m <= INT8_MAX_ROWS:
            check_int8_output(case, a, y_fed)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_size", [16, 20, 32, 64, 128, 100, 1000])
def test_repacked_equals_graph_input_b(bits, block_size, cpu_library, tmp_path):
    """K = 300 (not a multiple of the blocks; 1000 >= K is per-channel), N = 37 (a partial last tile
    of 8 columns), M = 1..8 and 9 (float path). 8 bits is not repacked (vpmaddubsw would saturate)."""
    rng = np.random.default_rng(bits * 100 + block_size)
    case = make_case(rng, 300, 37, bits, block_size, zero_points=bool(block_size % 3), bias=block_size != 32)
    compare(case, tmp_path, (1, 3, INT8_MAX_ROWS, INT8_MAX_ROWS + 1), _lib(cpu_library), expect_repack=bits <= 7)


@pytest.mark.parametrize("group", [1, 3, 8, 37])
@pytest.mark.parametrize("bits", [3, 4, 7])
def test_repacked_channel_groups(group, bits, cpu_library, tmp_path):
    rng = np.random.default_rng(group + bits)
    case = make_case(rng, 256, 37, bits, 32, group=group, zero_points=group != 8)
    compare(case, tmp_path, (1, 5), _lib(cpu_library))


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_repacked_float16(bits, cpu_library, tmp_path):
    rng = np.random.default_rng(40 + bits)
    case = make_case(rng, 200, 45, bits, 64, dtype=np.float16)
    compare(case, tmp_path, (1, 4), _lib(cpu_library))


@pytest.mark.parametrize("bits", [3, 7])
def test_repacked_long_blocks(bits, cpu_library, tmp_path):
    """One block of 4000 codes: longer than the int32 flush interval for 7 bits (128 codes), so
    both paths convert partial sums to float mid-block, at the same codes."""
    rng = np.random.default_rng(bits + 7)
    case = make_case(rng, 4000, 20, bits, 4000)
    compare(case, tmp_path, (1, 2), _lib(cpu_library))


def test_repacked_larger_multithreaded(cpu_library, tmp_path):
    rng = np.random.default_rng(5)
    case = make_case(rng, 2048, 300, 3, 32)
    compare(case, tmp_path, (1, 8), _lib(cpu_library))


def test_portable_isa_skips_repacked_path(cpu_library, tmp_path, monkeypatch):
    """OX_QUANT_OPS_ISA=portable: the repacked (AVX2) kernel is not used; results still exact."""
    monkeypatch.setenv("OX_QUANT_OPS_ISA", "portable")
    rng = np.random.default_rng(11)
    case = make_case(rng, 300, 37, 3, 32)
    compare(case, tmp_path, (1, 3), _lib(cpu_library), expect_repack=False)
