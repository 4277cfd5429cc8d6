"""``ox-quant verify`` says what it fed the models, never says PASSED without a threshold, and
turns inputs that do not fit the model into one line with a hint."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.verify_support import assert_one_line_error, run_cli, run_json


def _save(path, nodes, inputs, outputs, inits):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _ids_model(path, seed: int):
    """``ids int64[batch, seq] -> Unsqueeze -> Cast -> MatMul(W[1, 8])``: integer ids that index
    no embedding table, so generated values take the default range [0, 16)."""
    w = np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["ids", "axes"], ["u"]),
             helper.make_node("Cast", ["u"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "W"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
                 [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1], np.int64), "axes")])


def _reshape_model(path):
    """``x float[batch, seq] -> Reshape([-1, 3, 5])``: runs only when batch*seq is a multiple of 15."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 5])],
                 [numpy_helper.from_array(np.array([-1, 3, 5], np.int64), "shape")])


def test_generated_inputs_are_reported_with_their_range(tmp_path, capsys):
    ref = _ids_model(tmp_path / "ref.onnx", 0)
    code, payload = run_json(capsys, "verify", str(ref), str(ref), "--seed", "5")
    assert code == 0
    (info,) = payload["inputs"]
    assert info["name"] == "ids" and info["dtype"] == "int64" and info["shape"] == [2, 16]
    assert info["generated"] is True and info["source"] == "generated"
    assert info["rule"].startswith("integers in [0, 16) (default range") and "--int-range" in info["rule"]
    assert 0 <= info["min"] <= info["max"] <= 15
    code, out, _ = run_cli(capsys, "verify", str(ref), str(ref), "--int-range", "3:9", "--dim", "seq=4")
    assert code == 0
    assert "inputs (generated, seed 0):" in out
    line = next(text for text in out.splitlines() if text.strip().startswith("ids "))
    assert "int64[2x4]" in line and "integers in [3, 9) (--int-range)" in line


def test_loaded_inputs_are_reported_as_loaded(tmp_path, capsys):
    ref = _ids_model(tmp_path / "ref.onnx", 0)
    npz = tmp_path / "in.npz"
    np.savez(npz, ids=np.array([[7, 40, 2]], np.int64))
    code, out, _ = run_cli(capsys, "verify", str(ref), str(ref), "--inputs", str(npz))
    assert code == 0
    assert "inputs (file):" in out and "ids int64[1x3] values 2..40" in out and "integers in" not in out


def test_no_thresholds_is_not_a_pass(tmp_path, capsys):
    """A candidate unrelated to the reference (other weights): without a threshold verify
    says so instead of PASSED; with one, it fails."""
    ref, noise = _ids_model(tmp_path / "ref.onnx", 0), _ids_model(tmp_path / "noise.onnx", 1)
    code, out, _ = run_cli(capsys, "verify", str(ref), str(noise))
    assert code == 0
    assert "PASSED" not in out and "no thresholds given" in out
    code, payload = run_json(capsys, "verify", str(ref), str(noise))
    assert code == 0 and payload["verdict"] == "no thresholds given" and payload["passed"] is None
    assert payload["failures"] == [] and payload["thresholds"] == {"min_sqnr_db": None, "min_cosine": None}
    code, payload = run_json(capsys, "verify", str(ref), str(ref), "--min-sqnr", "60")
    assert code == 0 and payload["verdict"] == "passed" and payload["passed"] is True
    code, out, err = run_cli(capsys, "verify", str(ref), str(noise), "--min-cosine", "0.99")
    assert "FAILED" in out
    assert_one_line_error(code, err, "verification failed")


def test_generated_shapes_that_do_not_fit_give_a_hint(tmp_path, capsys):
    model = _reshape_model(tmp_path / "r.onnx")
    code, _, err = run_cli(capsys, "verify", str(model), str(model))  # 2 x 16 = 32: not a multiple of 15
    assert_one_line_error(code, err, "ONNX Runtime failed to run r.onnx")
    assert "cannot be reshaped" in err and "x float32[2x16]" in err
    assert "--dim NAME=VALUE" in err and "--inputs FILE.npz" in err and "[ONNXRuntimeError]" not in err
    code, payload = run_json(capsys, "verify", str(model), str(model), "--dim", "seq=15")
    assert code == 0 and payload["inputs"][0]["shape"] == [2, 15]


def test_loaded_shapes_that_do_not_fit_give_a_hint(tmp_path, capsys):
    model = _ids_model(tmp_path / "m.onnx", 0)
    path = tmp_path / "fixed.onnx"
    fixed = onnx.load(str(model))
    for dim in fixed.graph.input[0].type.tensor_type.shape.dim:
        dim.dim_value = 3  # ids[3, 3]
    onnx.save(fixed, str(path))
    npz = tmp_path / "in.npz"
    np.savez(npz, ids=np.zeros((2, 5), np.int64))
    code, _, err = run_cli(capsys, "verify", str(path), str(path), "--inputs", str(npz))
    assert_one_line_error(code, err, "ONNX Runtime failed to run fixed.onnx")
    assert "invalid dimensions" in err and "ids int64[2x5]" in err and "--inputs FILE.npz" in err


def test_pytorch_reference_failure_carries_the_hint(tmp_path, capsys):
    """The PyTorch toy-mlp takes [batch, 128]; fed the candidate's generated [2, 15] it fails."""
    candidate = _reshape_model(tmp_path / "r.onnx")
    code, _, err = run_cli(capsys, "verify", "toy-mlp", str(candidate), "--dim", "seq=15")
    assert_one_line_error(code, err, "the PyTorch model failed on the inputs")
    assert "x float32[2x15]" in err and "--dim NAME=VALUE" in err
