"""Quantized candidates: metrics order configurations, thresholds fail bad models, and
per-layer attribution is what an independent rebuild of the model measures."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ox_quant.verification.per_layer import _Tensors, quantized_weights
from ox_quant.verification.verify import verify
from tests.verify_support import assert_one_line_error, exported, quantize_qdq, run_cli, run_json  # noqa: F401


def test_hand_built_qdq_order_and_threshold(exported, tmp_path, capsys):  # noqa: F811
    ref, _ = exported["toy-mlp"]
    int8 = tmp_path / "int8_channel.onnx"
    int4 = tmp_path / "int4_tensor.onnx"
    assert len(quantize_qdq(ref, int8, bits=8, per_channel=True)) == 3
    quantize_qdq(ref, int4, bits=4, per_channel=False)
    good, bad = verify(ref, int8), verify(ref, int4)
    assert good.outputs[0].sqnr_db > bad.outputs[0].sqnr_db + 15  # ~6 dB per bit, plus granularity
    threshold = (good.outputs[0].sqnr_db + bad.outputs[0].sqnr_db) / 2
    code, out, _ = run_cli(capsys, "verify", str(ref), str(int8), "--min-sqnr", f"{threshold:.2f}")
    assert code == 0 and "PASSED" in out
    code, out, err = run_cli(capsys, "verify", str(ref), str(int4), "--min-sqnr", f"{threshold:.2f}")
    assert "FAILED" in out
    assert_one_line_error(code, err, "verification failed: output: SQNR")
    code, payload = run_json(capsys, "verify", str(ref), str(int4), "--min-cosine", "0.999999")
    assert code == 1 and payload["passed"] is False and "cosine" in payload["failures"][0]
    assert set(payload["outputs"][0]) >= {"name", "max_abs_err", "mean_abs_err", "rel_l2", "sqnr_db", "cosine"}


def test_convert_cli_configs_are_ordered(exported, tmp_path, capsys):  # noqa: F811
    ref, _ = exported["toy-transformer"]
    configs = {
        "int8-channel": ["--bits", "8", "--block-size", "-1", "--format", "qdq"],
        "int4-block32": ["--bits", "4", "--block-size", "32", "--format", "matmulnbits"],
        "int4-channel": ["--bits", "4", "--block-size", "-1", "--format", "qdq"],
        "int4-tensor": ["--bits", "4", "--granularity", "tensor", "--format", "qdq"],
    }
    sqnr = {}
    for label, flags in configs.items():
        out = tmp_path / f"{label}.onnx"
        code, converted = run_json(capsys, "convert", str(ref), "-o", str(out), *flags, "--exclude-op", "Gather")
        assert code == 0 and len(converted["quantized"]) == 7  # the Linear weights; the embedding stays float
        code, payload = run_json(capsys, "verify", str(ref), str(out))
        assert code == 0 and payload["verdict"] == "no thresholds given" and not payload["failures"]
        sqnr[label] = payload["outputs"][0]["sqnr_db"]
    assert sqnr["int8-channel"] > sqnr["int4-block32"] > sqnr["int4-channel"] > sqnr["int4-tensor"], sqnr
    code, _, err = run_cli(capsys, "verify", str(ref), str(tmp_path / "int4-tensor.onnx"), "--min-sqnr", "20")
    assert_one_line_error(code, err, "< 20 dB")


def _isolated_sqnr(ref_path, tmp_path, weight_name, values, feeds):
    """Independent of ox_quant.verification.per_layer: rewrite the initializer in a copy of the file."""
    model = onnx.load(str(ref_path))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == weight_name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values.astype(np.float32), weight_name))
    path = tmp_path / "isolated.onnx"
    onnx.save(model, str(path))

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    r, c = run(ref_path).astype(np.float64), run(path).astype(np.float64)
    return 10 * math.log10(np.sum(r**2) / np.sum((r - c) ** 2))


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_per_layer_matches_independent_rebuild(exported, tmp_path, capsys, fmt):  # noqa: F811
    ref, _ = exported["toy-transformer"]
    cand = tmp_path / f"{fmt}.onnx"
    code, _ = run_json(capsys, "convert", str(ref), "-o", str(cand), "--bits", "4", "--block-size", "32", "--format", fmt,
                       "--exclude-op", "Gather")
    assert code == 0
    report = verify(ref, cand, per_layer=True)
    layers = report.layers.layers
    assert report.layers.unmatched == () and len(layers) == 7
    assert {layer.weight for layer in layers} == {f"{n}.weight.T" for n in ("q", "k", "v", "o", "up", "down", "head")}
    assert [layer.output_sqnr_db for layer in layers] == sorted(layer.output_sqnr_db for layer in layers)
    assert all(layer.format == fmt and layer.bits == 4 for layer in layers)
    # each layer alone loses less than all of them together
    assert all(layer.output_sqnr_db > report.outputs[0].sqnr_db for layer in layers)
    proto = onnx.load(str(cand), load_external_data=False)
    found, _ = quantized_weights(proto, _Tensors(proto, cand.parent))
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int64)}
    worst = layers[0]
    values = next(q.values for q in found if q.name == worst.candidate_weight)
    expected = _isolated_sqnr(ref, tmp_path, worst.weight, values, feeds)
    assert math.isclose(worst.output_sqnr_db, expected, rel_tol=1e-6), (worst, expected)


def test_per_layer_on_hand_built_qdq_cli(exported, tmp_path, capsys):  # noqa: F811
    ref, _ = exported["toy-cnn"]
    cand = tmp_path / "cnn_int4.onnx"
    quantize_qdq(ref, cand, bits=4, per_channel=False)
    code, payload = run_json(capsys, "verify", str(ref), str(cand), "--per-layer")
    assert code == 0
    layers = payload["per_layer"]["layers"]
    assert {layer["weight"] for layer in layers} == {"fc1.weight", "fc2.weight"}
    assert all(layer["weight_sqnr_db"] < 40 and layer["bits"] == 4 for layer in layers)
    code, out, _ = run_cli(capsys, "verify", str(ref), str(cand), "--per-layer", "--top", "1")
    assert code == 0 and "worst 1 of 2" in out
