"""``verify --per-layer`` attributes every quantized weight in each registered format:
com.microsoft MatMulNBits and GatherBlockQuantized, DequantizeLinear (QDQ) and ox-quant's
own ``ox_quant.MatMulNBits`` (``--bits 3``); each format's dequantizer is held to what
ONNX Runtime computes from the same node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.formats.registry import FORMATS, format_named, format_of
from ox_quant.runtime.custom_ops import library_available
from ox_quant.runtime.session import make_session
from ox_quant.verification.per_layer import _Tensors, quantized_weights
from tests.verify_support import run_json

V, D, H, OUT = 64, 64, 96, 32


def embed_mlp(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """``ids[b, s] -> Gather(E[V, D]) -> MatMul(W1[D, H]) -> Relu -> MatMul(W2[H, OUT]) -> y``."""
    rng = np.random.default_rng(seed)
    weights = {
        "E": rng.standard_normal((V, D)).astype(np.float32),
        "W1": (rng.standard_normal((D, H)) * 0.2).astype(np.float32),
        "W2": (rng.standard_normal((H, OUT)) * 0.2).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed"),
        helper.make_node("MatMul", ["h0", "W1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return weights


CASES = {
    # flags -> {weight: format}
    "matmulnbits+gather_block_quantized": (["--block-size", "32"], {"E": "gather_block_quantized", "W1": "matmulnbits", "W2": "matmulnbits"}),
    "gather_block_quantized-asym": (["--block-size", "32", "--asymmetric"], {"E": "gather_block_quantized", "W1": "matmulnbits", "W2": "matmulnbits"}),
    "qdq": (["--block-size", "32", "--format", "qdq"], {"E": "qdq", "W1": "qdq", "W2": "qdq"}),
    "custom-3bit": (["--bits", "3", "--block-size", "32", "--include-op", "MatMul"], {"W1": "custom", "W2": "custom"}),
    "custom-channel-group": (["--bits", "5", "--granularity", "channel-group:8", "--asymmetric", "--include-op", "MatMul"],
                             {"W1": "custom", "W2": "custom"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_layer_lists_every_quantized_weight(tmp_path, capsys, case):
    flags, expected = CASES[case]
    if "custom" in expected.values() and not library_available():
        pytest.skip("the custom-op library is not built (ox-quant build-ops)")
    ref = tmp_path / "ref.onnx"
    weights = embed_mlp(ref)
    cand = tmp_path / "cand.onnx"
    code, report = run_json(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", str(ref), "-o", str(cand), *flags)
    assert code == 0
    assert {q["name"]: q["format"] for q in report["quantized"]} == expected

    ids = np.random.default_rng(1).integers(0, V, (2, 5)).astype(np.int64)
    y = make_session(cand).run(None, {"ids": ids})[0]  # ONNX Runtime runs the written model
    exact = np.maximum(weights["E"][ids] @ weights["W1"], 0) @ weights["W2"]
    assert float(np.abs(y - exact).max()) < 0.6 * float(np.abs(exact).max())  # 3-bit: 7 levels

    code, payload = run_json(capsys, "verify", str(ref), str(cand), "--per-layer", "--int-range", f"0:{V}")
    assert code == 0
    layers = payload["per_layer"]["layers"]
    assert payload["per_layer"]["unmatched"] == []
    assert {layer["weight"]: layer["format"] for layer in layers} == expected
    bits = 3 if "--bits" in flags and "3" in flags else 5 if "5" in flags else 4
    for layer in layers:
        assert layer["bits"] == bits
        assert list(layer["shape"]) == list(weights[layer["weight"]].shape)
        assert 5 < layer["weight_sqnr_db"] < 60 and layer["output_sqnr_db"] > 0


def _gather_only(path: Path, table: np.ndarray) -> None:
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", table.shape[1]])],
        [numpy_helper.from_array(table, "E")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _matmul_only(path: Path, w: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _dequantized(path: Path):
    proto = onnx.load(str(path), load_external_data=False)
    found, problems = quantized_weights(proto, _Tensors(proto, path.parent))
    assert problems == [] and len(found) == 1
    return found[0]


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gather_block_quantized_dequantizer_matches_onnxruntime(tmp_path, capsys, bits, asym):
    """The table ONNX Runtime gathers (all ids) is the format's ``W.T``, to float32 rounding."""
    table = np.random.default_rng(bits).standard_normal((40, 96)).astype(np.float32)
    _gather_only(tmp_path / "ref.onnx", table)
    cand = tmp_path / "cand.onnx"
    flags = ["--bits", str(bits), "--block-size", "32"] + (["--asymmetric"] if asym else [])
    code, _ = run_json(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", str(tmp_path / "ref.onnx"), "-o", str(cand), *flags)
    assert code == 0
    qw = _dequantized(cand)
    assert qw.format == "gather_block_quantized" and qw.values.shape == (96, 40)
    ort_table = make_session(cand).run(None, {"ids": np.arange(40, dtype=np.int64)})[0]
    np.testing.assert_allclose(qw.values.T, ort_table, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flags", [["--bits", "3", "--block-size", "16"], ["--bits", "6", "--granularity", "channel-group:4", "--asymmetric"],
                                   ["--bits", "2", "--granularity", "tensor"]])
def test_custom_dequantizer_matches_onnxruntime(tmp_path, capsys, flags):
    """``I_K @ W`` through ox_quant.MatMulNBits is the format's ``W[K, N]``."""
    if not library_available():
        pytest.skip("the custom-op library is not built (ox-quant build-ops)")
    w = np.random.default_rng(7).standard_normal((48, 24)).astype(np.float32)
    _matmul_only(tmp_path / "ref.onnx", w)
    cand = tmp_path / "cand.onnx"
    code, report = run_json(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", str(tmp_path / "ref.onnx"), "-o", str(cand), "--format", "custom", *flags)
    assert code == 0 and report["quantized"][0]["format"] == "custom"
    qw = _dequantized(cand)
    ort_w = make_session(cand).run(None, {"x": np.eye(48, dtype=np.float32)})[0]
    np.testing.assert_allclose(qw.values, ort_w, rtol=1e-5, atol=1e-6)


def test_registry_is_consistent():
    """Names and node types are unique, and every format finds its own nodes."""
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    for fmt in FORMATS:
        assert format_named(fmt.name) is fmt
        assert format_of(fmt.domain, fmt.op_type) is fmt
    assert format_of("", "MatMul") is None
