"""``ox-quant verify``: inputs (file, generated, ranges), JSON shape, and every error path."""

from __future__ import annotations

import numpy as np
import pytest

from ox_quant.runtime.session import cuda_available
from ox_quant.verification.inputs import generate_inputs, load_graph
from tests.verify_support import assert_one_line_error, exported, quantize_qdq, run_cli, run_json  # noqa: F401


def test_generated_integer_inputs_follow_the_embedding(exported):  # noqa: F811
    path, _ = exported["toy-transformer"]
    graph = load_graph(path)
    ids = generate_inputs(graph, seed=3)["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 16)
    assert ids.min() >= 0 and ids.max() < 256 and ids.max() > 16  # the vocab, not the fallback [0, 16)
    narrow = generate_inputs(graph, seed=3, int_range=(5, 7), dims={"sequence": 4})["input_ids"]
    assert narrow.shape == (2, 4) and set(np.unique(narrow)) <= {5, 6}
    np.testing.assert_array_equal(generate_inputs(graph, seed=3)["input_ids"], ids)  # fixed seed


def test_inputs_from_npz_and_json(exported, tmp_path, capsys):  # noqa: F811
    path, _ = exported["toy-transformer"]
    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=np.arange(15, dtype=np.int32).reshape(3, 5))  # int32 is cast to int64
    code, payload = run_json(capsys, "verify", "toy-transformer", str(path), "--inputs", str(npz), "--min-sqnr", "80")
    assert code == 0 and payload["passed"] is True
    assert payload["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [3, 5], "source": "file",
                                  "generated": False, "min": 0, "max": 14, "rule": None}]
    assert payload["reference_kind"] == "pytorch" and payload["outputs"][0]["shape"] == [3, 5, 256]
    code, payload = run_json(capsys, "verify", str(path), str(path), "--int-range", "0:10", "--dim", "batch=1")
    assert code == 0 and payload["outputs"][0]["sqnr_db"] is None  # identical: infinite SQNR
    assert payload["outputs"][0]["max_abs_err"] == 0.0 and payload["inputs"][0]["shape"] == [1, 16]


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA; the no-GPU message cannot be shown")
def test_cuda_without_gpu_is_one_line(exported, capsys):  # noqa: F811
    path, _ = exported["toy-mlp"]
    code, _, err = run_cli(capsys, "verify", str(path), str(path), "--provider", "cuda")
    assert_one_line_error(code, err, "CUDA execution provider is not available")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA device here: CPU vs CUDA comparison needs a GPU")
def test_cuda_compares_with_cpu(exported, capsys):  # noqa: F811
    path, _ = exported["toy-mlp"]
    code, payload = run_json(capsys, "verify", str(path), str(path), "--provider", "cuda")
    assert code == 0 and payload["provider"] == "cuda"
    check = payload["provider_check"][0]["sqnr_db"]
    assert check is None or check > 60  # None: CUDA and CPU outputs identical


def test_verify_error_paths(exported, tmp_path, capsys):  # noqa: F811
    mlp, _ = exported["toy-mlp"]
    cnn, _ = exported["toy-cnn"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    wrong_npz = tmp_path / "wrong.npz"
    np.savez(wrong_npz, other=np.zeros((2, 128), np.float32))
    rank_npz = tmp_path / "rank.npz"
    np.savez(rank_npz, x=np.zeros(128, np.float32))
    m, c = str(mlp), str(cnn)
    cases = [
        (["verify", m, str(tmp_path / "none.onnx")], "candidate model not found"),
        (["verify", str(tmp_path / "none.onnx"), m], "reference model not found"),
        (["verify", m, str(garbage)], "cannot read ONNX model"),
        (["verify", m, m, "--inputs", str(tmp_path / "none.npz")], "inputs file not found"),
        (["verify", m, m, "--inputs", str(wrong_npz)], "has no array named 'x'"),
        (["verify", m, m, "--inputs", str(rank_npz)], "rank 1, model expects rank 2"),
        (["verify", m, m, "--int-range", "9"], "expected LO:HI"),
        (["verify", m, m, "--int-range", "5:5"], "HI must be greater"),
        (["verify", m, m, "--dim", "batch"], "expected NAME=SIZE"),
        (["verify", "toy-mlp", m, "--per-layer"], "--per-layer needs an ONNX reference"),
        (["verify", m, m, "--per-layer"], "has no quantized weights"),
        (["verify", c, m], "needs inputs the candidate does not have"),
        (["verify", "toy-cnn", m], "the PyTorch model failed on the inputs"),
        (["verify", "no-such-model", m], "unknown model 'no-such-model'"),
    ]
    for args, fragment in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, fragment)
    code, _, err = run_cli(capsys, "verify", m, m, "--provider", "tpu")
    assert code == 2 and "Traceback" not in err  # usage errors are click's own (exit 2)


def test_output_shape_mismatch_is_one_line(exported, tmp_path, capsys):  # noqa: F811
    import onnx

    path, _ = exported["toy-mlp"]
    model = onnx.load(str(path))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    slice_node = onnx.helper.make_node("Slice", [gemm.output[0], "s0", "s1", "s2"], ["sliced"])
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s1", 10), ("s2", 1))]
    )
    model.graph.node.append(slice_node)
    model.graph.output[0].name = "sliced"
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    out = tmp_path / "sliced.onnx"
    onnx.save(model, str(out))
    code, _, err = run_cli(capsys, "verify", str(path), str(out))
    assert_one_line_error(code, err, "reference shape (2, 64) != candidate shape (2, 10)")
