"""Calibration of a model over 2 GB (external data) stays within a memory bound.

Nine 8192 x 8192 float32 MatMul weights in a chain (2.25 GiB of sparse external data, zero but
for a seeded 128 x 128 patch each). A child process converts it with ``--calibration`` (one
pass over two feeds: ONNX Runtime runs the model with every weight's input exposed) and
prints its own peak resident set (VmHWM). The bound: one copy of the weights plus 1 GiB; the
weights read twice (e.g. by Python and by ONNX Runtime, or repacked by ONNX Runtime's MatMul)
would be over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ox_quant.core.config import Block, QuantConfig
from ox_quant.core.quantize import quantize
from tests.helpers import relative_error, run

pytestmark = pytest.mark.slow

SIZE, PATCH, COUNT = 8192, 128, 9
WEIGHT_BYTES = SIZE * SIZE * 4 * COUNT
BOUND = WEIGHT_BYTES + (1 << 30)

CHILD = """
import sys, json
from ox_quant.calibration.feeds import calibration_feeds
from ox_quant.core.config import Block, QuantConfig
from ox_quant.pipeline.convert import ConvertOptions, convert
data = None if sys.argv[3] == "-" else sys.argv[3]
options = ConvertOptions(config=QuantConfig(bits=4, granularity=Block(128), algorithm=sys.argv[4]),
                         calibration_data=(lambda m: calibration_feeds(data, m)) if data else None)
report = convert(sys.argv[1], sys.argv[2], options)
with open("/proc/self/status") as status:  # this process's own peak
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "calibration": report.calibration,
                  "errors": [q.calibration.error for q in report.quantized if q.calibration]}))
"""


def chain_model(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    data = tmp_path / "big.onnx.data"
    nbytes = SIZE * SIZE * 4
    rng = np.random.default_rng(5)
    patches = []
    with open(data, "wb") as f:
        f.truncate(nbytes * COUNT)
        for i in range(COUNT):
            patch = (rng.standard_normal((PATCH, PATCH)) / np.sqrt(PATCH)).astype(np.float32)
            patches.append(patch)
            for row in range(PATCH):
                f.seek(i * nbytes + row * SIZE * 4)
                f.write(patch[row].tobytes())
    inits, nodes = [], []
    for i in range(COUNT):
        t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[SIZE, SIZE])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"],
                                      ["y" if i == COUNT - 1 else f"h{i}"]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SIZE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    src = tmp_path / "big.onnx"
    onnx.save(model, str(src))
    return src, patches


def child(*args: str) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calibrating_a_model_over_2gb_stays_within_one_copy_of_its_weights(tmp_path):
    src, patches = chain_model(tmp_path)
    rng = np.random.default_rng(6)
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(2):
        x = np.zeros((1, SIZE), dtype=np.float32)
        x[0, :PATCH] = rng.standard_normal(PATCH)
        np.savez(feeds / f"{i}.npz", x=x)
    result = child(str(src), str(tmp_path / "out.onnx"), str(feeds), "rtn")
    plain = child(str(src), str(tmp_path / "plain.onnx"), "-", "rtn")
    print(f"convert peak with calibration {result['peak'] / 2**30:.2f} GiB, without {plain['peak'] / 2**30:.2f} GiB "
          f"(weights {WEIGHT_BYTES / 2**30:.2f} GiB)")
    assert result["calibration"]["samples"] == 2 and result["calibration"]["passes"] == 1
    assert len(result["errors"]) == COUNT and all(e > 0 for e in result["errors"])
    assert result["peak"] < BOUND
    x = np.zeros((1, SIZE), dtype=np.float32)
    x[0, :PATCH] = rng.standard_normal(PATCH)
    y = run(tmp_path / "out.onnx", {"x": x})[0]
    expected = x[:, :PATCH].astype(np.float64)
    config = QuantConfig(bits=4, granularity=Block(128))
    for patch in patches:  # each 128 x 1 block of the patch is a group of its own; the rest is zero
        expected = expected @ quantize(patch, config).dequantize()
    assert relative_error(y[:, :PATCH], expected) < 1e-4 and not y[:, PATCH:].any()
