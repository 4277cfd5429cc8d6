"""Small ONNX models built by hand for tests, and the float64 reference they are held to."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.runtime.session import make_session

ONNX_DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def matmul_model(
    path: Path,
    weights: dict[str, np.ndarray],
    batch_dims: tuple[int | str, ...] = ("batch", 3),
    dtype: type = np.float32,
    opset: int = 21,
    ir_version: int = 10,
    external: bool = False,
) -> Path:
    """A chain ``x -> MatMul(W1) -> MatMul(W2) -> ... -> y`` with ``x[*batch_dims, K1]``.

    Weights are used in insertion order; each ``W_i`` is ``[K_i, N_i]`` with ``K_{i+1} = N_i``.
    """
    names = list(weights)
    nodes = []
    current = "x"
    for i, name in enumerate(names):
        out = "y" if i == len(names) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, name], [out], name=f"matmul_{name}"))
        current = out
    first = weights[names[0]]
    last = weights[names[-1]]
    elem = ONNX_DTYPES[dtype]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [*batch_dims, first.shape[0]])],
        [helper.make_tensor_value_info("y", elem, [*batch_dims, last.shape[1]])],
        [numpy_helper.from_array(w.astype(dtype), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model on the CPU EP with exact (float) QDQ fusion."""
    return make_session(path).run(None, feeds)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max |e|."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def random_weights(rng: np.random.Generator, *dims: int) -> dict[str, np.ndarray]:
    """Weights ``W0[d0, d1], W1[d1, d2], ...`` with a few outliers and an all-zero column."""
    out = {}
    for i in range(len(dims) - 1):
        w = rng.standard_normal((dims[i], dims[i + 1])).astype(np.float32) * 0.05
        w[rng.integers(0, dims[i]), rng.integers(0, dims[i + 1])] = 1.5  # outlier
        w[:, 0] = 0.0  # all-zero output channel: no NaN/Inf allowed
        out[f"W{i}"] = w
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ox-quant ARGS`` in-process: (exit code, stdout, stderr)."""
    from ox_quant.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
