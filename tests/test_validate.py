"""Validation on load reads the graph, not the weights, and lets valid graphs through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.ir.modelio import load_model
from ox_quant.ir.validate import weightless_copy
from ox_quant.runtime.session import make_session

REPO = Path(__file__).resolve().parents[1]


def test_weightless_copy_drops_initializers_and_large_constants():
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    big = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(np.ones((64, 64), np.float32)))
    small = helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([64, 64], np.int64)))
    nodes = [big, small, helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "C"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    skeleton = weightless_copy(model, 10)
    assert list(skeleton.graph.initializer) == []
    assert [n.output[0] for n in skeleton.graph.node if n.op_type == "Constant"] == ["shape"]
    assert {i.name for i in skeleton.graph.input} == {"x", "W", "C"}
    assert skeleton.ByteSize() < 1000 < model.ByteSize() // 10
    onnx.checker.check_model(skeleton, full_check=True)


def test_subgraph_with_external_initializer_converts(tmp_path):
    """An If branch holding an external initializer: ORT's graph check finds it beside the model."""
    c = numpy_helper.from_array(np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 100, "C")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "C"], ["o1"])], "then", [],
                               [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [2, 16])], [c])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2, 16])])
    w = numpy_helper.from_array(np.ones((64, 16), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="if.onnx.data", size_threshold=0)
    load_model(path, runnable=True)  # raises if the weightless ORT check cannot find C's data
    make_session(path)


def test_validation_reads_no_weights(tmp_path):
    """A 3 GiB external weight in a sparse file: loading (all checks, ORT's included) stays small."""
    pytest.importorskip("resource")  # the child measures its own peak memory with it
    k, n = 32768, 24576  # 3 GiB of float32
    data = tmp_path / "big.onnx.data"
    with open(data, "wb") as f:
        f.truncate(k * n * 4)
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[k, n])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=data.name)
    w.external_data.add(key="length", value=str(k * n * 4))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    script = (
        "import json, resource, sys\n"
        "from ox_quant.ir.modelio import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "load_model(sys.argv[1], runnable=True)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps([before, after]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout)
    assert (after - before) * 1024 < 256 * 2**20, f"peak RSS grew by {(after - before) / 1024:.0f} MiB"
