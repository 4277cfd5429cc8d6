"""Shared fixtures and builders for the export / verify tests.

Import the fixtures into a test module (``from verify_support import exported``) so pytest
finds them; toy models are exported once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import run_cli

TOY_MODELS = ("toy-mlp", "toy-transformer", "toy-cnn")


_EXPORTED: dict[str, tuple[Path, object]] = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (path of the float ONNX export, ExportReport) for every toy model.

    Each test module imports this fixture, which makes pytest treat it as one fixture per
    module; the module-level cache keeps it to one export per model per test session."""
    from ox_quant.export.exporter import export_spec

    if not _EXPORTED:
        out_dir = tmp_path_factory.mktemp("exported")
        for name in TOY_MODELS:
            path = out_dir / f"{name}.onnx"
            _EXPORTED[name] = (path, export_spec(name, path))
    return _EXPORTED


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code, out, err = run_cli(capsys, *args, "--json")
    assert out.strip(), err
    return code, json.loads(out)


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ox-quant: error: ")
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


def quantize_qdq(src: Path, dst: Path, bits: int, per_channel: bool) -> list[str]:
    """A hand-made QDQ model: every MatMul/Gemm weight becomes DequantizeLinear of a
    symmetric signed integer initializer (per output channel along N, or per tensor).
    Independent of ox-quant's converter. Returns the float weight names replaced."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    qmax = 2 ** (bits - 1) - 1
    dtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    replaced = []
    for node in list(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        name = node.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        channel_axis = 0 if trans_b else 1
        if per_channel:
            scale = np.abs(w).max(axis=1 - channel_axis) / qmax
        else:
            scale = np.array(np.abs(w).max() / qmax, dtype=np.float32)
        shape = [1, 1]
        shape[channel_axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape) if per_channel else w / scale), -qmax, qmax).astype(np.int8)
        graph.initializer.remove(inits[name])
        graph.initializer.append(helper.make_tensor(f"{name}_q", dtype, q.shape, q.flatten().tolist()))
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        dq = helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_scale"], [name], name=f"{name}_dq", axis=channel_axis
        )
        graph.node.insert(0, dq)
        replaced.append(name)
    onnx.save(model, str(dst))
    return replaced
