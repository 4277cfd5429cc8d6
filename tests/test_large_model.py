"""A model over 2 GB (protobuf's limit) converts with external data and runs.

The weights live in a sparse external-data file: nine 8192 x 8192 float32 matrices
(2.25 GiB), zero except a seeded 128 x 128 patch in each, so the test costs little disk.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ox_quant.core.config import Block, QuantConfig
from ox_quant.core.quantize import quantize
from ox_quant.pipeline.convert import ConvertOptions, convert
from tests.helpers import relative_error, run

pytestmark = pytest.mark.slow

SIZE, PATCH, COUNT = 8192, 128, 9


def test_model_over_2gb_converts_and_runs(tmp_path):
    data = tmp_path / "big.onnx.data"
    nbytes = SIZE * SIZE * 4
    rng = np.random.default_rng(5)
    patches = []
    with open(data, "wb") as f:
        f.truncate(nbytes * COUNT)
        for i in range(COUNT):
            patch = rng.standard_normal((PATCH, PATCH)).astype(np.float32)
            patches.append(patch)
            for row in range(PATCH):
                f.seek(i * nbytes + row * SIZE * 4)
                f.write(patch[row].tobytes())
    inits, nodes, outputs = [], [], []
    for i in range(COUNT):
        t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[SIZE, SIZE])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, SIZE]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZE])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    src = tmp_path / "big.onnx"
    onnx.save(model, str(src))

    config = QuantConfig(bits=4, granularity=Block(PATCH))
    report = convert(src, tmp_path / "out.onnx", ConvertOptions(config=config))
    assert report.input_bytes > 2**31 and len(report.quantized) == COUNT
    assert report.external_data is not None and report.external_data.is_file()

    x = np.zeros((1, SIZE), dtype=np.float32)
    x[0, :PATCH] = rng.standard_normal(PATCH)
    ys = run(tmp_path / "out.onnx", {"x": x})
    for patch, y in zip(patches, ys, strict=True):
        expected = np.zeros((1, SIZE))
        expected[0, :PATCH] = x[0, :PATCH].astype(np.float64) @ quantize(patch, config).dequantize()
        assert relative_error(y, expected) <= 1e-5
