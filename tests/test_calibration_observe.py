"""The calibration primitive: intermediate tensors exposed on ONNX Runtime, streamed over feeds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.calibration.observe import Observer, observe
from ox_quant.errors import OxQuantError
from ox_quant.ir.modelio import load_model
from tests.helpers import matmul_model


def relu_chain(path, rng, external=False):
    w0 = rng.standard_normal((8, 6)).astype(np.float32)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                              [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return w0, w1


@pytest.mark.parametrize("external", [False, True])
def test_exposed_tensors_match_numpy(tmp_path, external):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    w0, w1 = relu_chain(path, rng, external)
    feeds = [{"x": rng.standard_normal((3, 8)).astype(np.float32)} for _ in range(4)]
    seen = []
    count = observe(path, ["r", "x", "y"], feeds, lambda i, t: seen.append((i, t)))
    assert count == 4 and [i for i, _ in seen] == [0, 1, 2, 3]
    for feed, (_, tensors) in zip(feeds, seen, strict=True):
        r = np.maximum(feed["x"].astype(np.float64) @ w0, 0)
        np.testing.assert_allclose(tensors["r"], r, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(tensors["x"], feed["x"])
        np.testing.assert_allclose(tensors["y"], r @ w1, rtol=1e-4, atol=1e-4)


def test_prune_runs_only_what_is_needed_and_overrides_replace_weights(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "m.onnx"
    w0, _ = relu_chain(path, rng)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    observer = Observer(load_model(path), ["h"], initializers={"W0": 2 * w0, "W1": np.zeros((6, 4), np.float32)})
    assert observer.input_names == ("x",)
    np.testing.assert_allclose(observer.run({"x": x})["h"], x @ (2 * w0), rtol=1e-5)
    # without pruning the model's own output is computed too, with the override in force
    full = Observer(path, ["h"], prune=False, initializers={"W0": 2 * w0})
    np.testing.assert_allclose(full.run({"x": x})["h"], x @ (2 * w0), rtol=1e-5)


def test_memmapped_override_is_not_copied(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "m.onnx"
    w0, _ = relu_chain(path, rng)
    stored = np.lib.format.open_memmap(tmp_path / "w0.npy", mode="w+", dtype=np.float32, shape=w0.shape)
    stored[:] = -w0
    stored.flush()
    mapped = np.load(tmp_path / "w0.npy", mmap_mode="r")
    observer = Observer(path, ["h"], initializers={"W0": mapped})
    assert observer._overrides[0].data_ptr() == mapped.ctypes.data
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(observer.run({"x": x})["h"], x @ -w0, rtol=1e-5)


def test_bad_names_are_one_line_errors(tmp_path):
    path = matmul_model(tmp_path / "m.onnx", {"W0": np.ones((4, 4), np.float32)})
    with pytest.raises(OxQuantError, match="cannot observe 'nope'"):
        Observer(path, ["nope"])
    with pytest.raises(OxQuantError, match="cannot replace initializer 'W9'"):
        Observer(path, ["y"], initializers={"W9": np.ones((4, 4), np.float32)})
    with pytest.raises(OxQuantError, match="no array for model input 'x'"):
        Observer(path, ["y"]).run({"z": np.ones((1, 3, 4), np.float32)})


def test_large_embedded_weights_are_read_in_place(tmp_path):
    """Weights embedded in the model file (read in place, not parsed) reach ONNX Runtime from the file."""
    rng = np.random.default_rng(3)
    weights = {"W0": rng.standard_normal((64, 64)).astype(np.float32), "W1": rng.standard_normal((64, 32)).astype(np.float32)}
    path = matmul_model(tmp_path / "m.onnx", weights)
    model = load_model(path)
    assert isinstance(model.graph.initializers["W0"].const_value, __import__("onnx_ir").ExternalTensor)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    h = Observer(model, ["h0"]).run({"x": x})["h0"]
    np.testing.assert_allclose(h, x @ weights["W0"], rtol=1e-4, atol=1e-4)
