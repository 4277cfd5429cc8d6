"""What convert, inspect and demo tell the user: Constant-node weights, ONNX Runtime's own
quantizer outputs, grouped skips, stored shapes, version changes, the rule for an explicit
``--format``, a selection that matches nothing, the demo's files, the ``--format`` help.

Every model written here is loaded and run by ONNX Runtime."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.cli import main
from ox_quant.runtime.session import make_session
from tests.helpers import matmul_model, random_weights, run

RNG = np.random.default_rng(5)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("ox-quant: error: ") and fragment in err, err


def weight(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.1).astype(np.float32)


def save(path, nodes, inputs, outputs, inits=(), opset=21):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.save(model, str(path))
    return path


def vi(name, *shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def mixed_model(path):
    """Gather(emb[50, 64]) -> MatMul(up[64, 128]); Conv(cw[16, 3, 3, 3], cb) on an image."""
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h0"]),
             helper.make_node("MatMul", ["h0", "up"], ["y"]),
             helper.make_node("Conv", ["img", "cw", "cb"], ["z"])]
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"emb": weight(50, 64), "up": weight(64, 128), "cw": weight(16, 3, 3, 3), "cb": weight(16)}.items()]
    return save(path, nodes, [vi("ids", 2, 3, dtype=TensorProto.INT64), vi("img", 1, 3, 8, 8)],
                [vi("y", 2, 3, 128), vi("z", 1, 16, 6, 6)], inits)


MIXED_FEEDS = {"ids": np.array([[1, 2, 3], [4, 5, 49]], np.int64),
               "img": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}


# ------------------------------------------------------------------ 9a: inspect
def test_inspect_counts_constant_node_weights(tmp_path, capsys):
    w_const, w_init = weight(32, 16), weight(16, 8)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w_const, "Wc")),
             helper.make_node("MatMul", ["x", "Wc"], ["h"]), helper.make_node("MatMul", ["h", "Wi"], ["y"])]
    src = save(tmp_path / "c.onnx", nodes, [vi("x", 2, 32)], [vi("y", 2, 8)], [numpy_helper.from_array(w_init, "Wi")])
    code, out, err = cli(capsys, "inspect", str(src), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["float_weights"], info["float_constants"]) == (2, 1)
    assert info["float_weight_bytes"] == w_const.nbytes + w_init.nbytes
    code, out, _ = cli(capsys, "inspect", str(src))
    assert "2 float tensors left as float (1 initializers, 1 in Constant nodes)" in out
    # quantized, the Constant-node weight is folded and quantized too: its scales are not float weights
    q = tmp_path / "q.onnx"
    assert cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(q), "--bits", "8", "--block-size", "-1", "--format", "qdq")[0] == 0
    info = json.loads(cli(capsys, "inspect", str(q), "--json")[1])
    assert len(info["quantized"]) == 2 and info["float_weights"] == 0
    run(q, {"x": RNG.standard_normal((2, 32)).astype(np.float32)})


@pytest.mark.parametrize("algo", ["rtn", "k_quant"])
def test_inspect_reads_onnx_runtime_weight_only_outputs(tmp_path, capsys, algo):
    """ONNX Runtime's RTN and k-quant weight-only quantizers write MatMulNBits without a
    com.microsoft opset import; ONNX Runtime runs such models, so inspect and convert read them."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    # K = 256 with blocks of 128: ONNX Runtime's packer of 4-bit zero points needs an even
    # number of blocks per column (one block fails inside its quantizer).
    src = matmul_model(tmp_path / "m.onnx", random_weights(np.random.default_rng(1), 256, 256, 64))
    config = mq.RTNWeightOnlyQuantConfig() if algo == "rtn" else mq.KQuantWeightOnlyQuantConfig()
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k-quant divides 0/0 on the all-zero column
        quantizer = mq.MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
    capsys.readouterr()  # its progress bar
    path = tmp_path / f"{algo}.onnx"
    onnx.save(quantizer.model.model, str(path))
    assert "com.microsoft" not in {o.domain for o in onnx.load(str(path)).opset_import}
    x = RNG.standard_normal((1, 3, 256)).astype(np.float32)
    (expected,) = run(path, {"x": x})  # ONNX Runtime runs it as written
    code, out, err = cli(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert [(q["format"], q["shape"], q["bits"], q["granularity"], q["block_size"], q["symmetric"])
            for q in info["quantized"]] == [("matmulnbits", [256, 256], 4, "block", 128, False),
                                            ("matmulnbits", [256, 64], 4, "block", 128, False)]
    assert info["float_weights"] == 0 and info["opsets"]["com.microsoft"] == 1
    out_path = tmp_path / "again.onnx"  # nothing left to quantize: a copy that declares its imports
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(path), "-o", str(out_path), "--json")
    assert code == 0, err
    assert json.loads(out)["quantized"] == []
    assert {o.domain: o.version for o in onnx.load(str(out_path)).opset_import}["com.microsoft"] == 1
    np.testing.assert_array_equal(run(out_path, {"x": x})[0], expected)


# -------------------------------------------------------------- 9b: grouped skips
def test_skips_are_grouped_in_the_summary_and_listed_in_json(tmp_path, capsys):
    """Six Gemm layers with biases, four int64 tables and their int64 indices: the summary shows two groups
    with counts and a few names; --json keeps every skip and adds the summary."""
    nodes, inits, current = [], [], "x"
    for i in range(6):
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}"))
        inits += [numpy_helper.from_array(weight(32, 32), f"W{i}"), numpy_helper.from_array(weight(32), f"b{i}")]
        current = f"h{i}"
    outputs = [vi(current, 4, 32)]
    for i in range(4):
        nodes.append(helper.make_node("Gather", [f"idx{i}", "pick"], [f"g{i}"]))
        inits.append(numpy_helper.from_array(np.arange(8, dtype=np.int64) + i, f"idx{i}"))
        outputs.append(vi(f"g{i}", 2, dtype=TensorProto.INT64))
    inits.append(numpy_helper.from_array(np.array([0, 3], np.int64), "pick"))
    src = save(tmp_path / "s.onnx", nodes, [vi("x", 4, 32)], outputs, inits)
    out_path = tmp_path / "q.onnx"
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32")
    assert code == 0, err
    assert "11 left as they are" in out
    assert "6  used as input 2 of Gemm: b0, b1, b2, ... (+3)" in out
    assert "5  weight dtype INT64 is not a float type: idx0, idx1, idx2, ... (+2)" in out
    assert "b4" not in out and "idx3" not in out
    code, out, _ = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32", "--json")
    report = json.loads(out)
    assert sorted(s["name"] for s in report["skipped"]) == sorted([f"b{i}" for i in range(6)] + [f"idx{i}" for i in range(4)] + ["pick"])
    assert report["skipped_summary"] == [
        {"reason": "used as input 2 of Gemm", "count": 6, "names": ["b0", "b1", "b2"]},
        {"reason": "weight dtype INT64 is not a float type", "count": 5, "names": ["idx0", "idx1", "idx2"]},
    ]
    run(out_path, {"x": RNG.standard_normal((4, 32)).astype(np.float32)})


# ------------------------------------------------------------- 9c: stored shapes
def test_convert_shows_the_stored_shape_like_inspect(tmp_path, capsys):
    src = mixed_model(tmp_path / "m.onnx")
    out_path = tmp_path / "q.onnx"
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "weight" in line and "shape" in line)
    assert "[K, N]" in header
    conv_row = next(line for line in out.splitlines() if line.strip("│ ").startswith("cw"))
    assert "16x3x3x3" in conv_row and "27x16" in conv_row
    report = json.loads(cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32", "--json")[1])
    shapes = {q["name"]: (q["stored_shape"], q["shape"]) for q in report["quantized"]}
    assert shapes == {"emb": ([50, 64], [64, 50]), "up": ([64, 128], [64, 128]), "cw": ([16, 3, 3, 3], [27, 16])}
    inspected = json.loads(cli(capsys, "inspect", str(out_path), "--json")[1])
    conv = next(q for q in inspected["quantized"] if q["name"].startswith("cw"))
    assert conv["shape"] == [16, 3, 3, 3]
    run(out_path, MIXED_FEEDS)


# ----------------------------------------------------------- 9d: version changes
def test_opset_upgrade_is_reported(tmp_path, capsys):
    src = matmul_model(tmp_path / "m13.onnx", random_weights(RNG, 64, 32), opset=13, ir_version=8)
    out_path = tmp_path / "q.onnx"
    args = ["convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--bits", "8", "--block-size", "-1", "--format", "qdq"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "note: ai.onnx opset raised 13 -> 21: 1 weight(s) are written as DequantizeLinear" in out
    assert "note: IR version raised 8 -> 10" in out
    report = json.loads(cli(capsys, *args, "--json")[1])
    opset = report["version_changes"][0]
    assert (opset["what"], opset["from"], opset["to"]) == ("ai.onnx opset", 13, 21) and "opset 21" in opset["reason"]
    assert {o.domain: o.version for o in onnx.load(str(out_path)).opset_import}[""] == 21
    run(out_path, {"x": RNG.standard_normal((2, 3, 64)).astype(np.float32)})
    # MatMulNBits needs no upgrade: nothing changed, nothing said
    code, out, _ = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32", "--json")
    assert code == 0 and json.loads(out)["version_changes"] == []


# --------------------------------------------------- 9e: explicit --format rule
def test_explicit_format_writes_only_itself_and_skips_the_rest(tmp_path, capsys):
    src = mixed_model(tmp_path / "m.onnx")
    out_path = tmp_path / "q.onnx"
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--format", "matmulnbits",
                         "--block-size", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {q["name"]: q["format"] for q in report["quantized"]} == {"emb": "gather_block_quantized", "up": "matmulnbits"}
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert reasons["cw"].startswith("--format matmulnbits cannot hold Conv weights")
    run(out_path, MIXED_FEEDS)


def test_explicit_custom_format_carries_on_like_matmulnbits(tmp_path, capsys):
    from ox_quant.runtime.custom_ops import library_available

    src = mixed_model(tmp_path / "m.onnx")
    out_path = tmp_path / "q.onnx"
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--format", "custom", "--bits", "3",
                         "--block-size", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {q["name"]: q["format"] for q in report["quantized"]} == {"up": "custom"}
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert "Conv weights" in reasons["cw"] and "custom has no Gather op" in reasons["emb"]
    if not library_available():
        pytest.skip("custom-op library not built (ox-quant build-ops): the output cannot be run here")
    run(out_path, MIXED_FEEDS)


@pytest.mark.parametrize("args, message", [
    (["--format", "matmulnbits", "--bits", "3"], "takes 2/4/8 bits, not 3"),
    (["--format", "qdq", "--bits", "3"], "--format qdq cannot express int3"),
    (["--format", "custom", "--include-op", "Conv"], "--format custom cannot hold Conv weights"),
])
def test_explicit_format_that_holds_no_weight_exits_1(tmp_path, capsys, args, message):
    src = mixed_model(tmp_path / "m.onnx")
    out_path = tmp_path / "q.onnx"
    code, _, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--block-size", "32", *args)
    one_line_error(code, err, message)
    assert not out_path.exists()


# ------------------------------------------------- 9f: a selection that matches nothing
def test_selection_that_matches_nothing_exits_1(tmp_path, capsys):
    nodes = [helper.make_node("Gemm", ["x", "W0"], ["h"], transB=1), helper.make_node("Gemm", ["h", "W1"], ["y"])]
    src = save(tmp_path / "gemm.onnx", nodes, [vi("x", 2, 64)], [vi("y", 2, 16)],
               [numpy_helper.from_array(weight(32, 64), "W0"), numpy_helper.from_array(weight(32, 16), "W1")])
    out_path = tmp_path / "q.onnx"
    before = src.read_bytes()
    code, _, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--include-op", "MatMul")
    one_line_error(code, err, "no weight matched the selection (ops MatMul)")
    assert "read by Gemm (2)" in err and "nothing written" in err
    code, _, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--include", "^nomatch$")
    one_line_error(code, err, "no weight matched the selection (--include '^nomatch$')")
    assert not out_path.exists() and src.read_bytes() == before
    code, out, err = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", str(src), "-o", str(out_path), "--include-op", "Gemm", "--block-size", "32")
    assert code == 0 and "2 weights quantized" in out, err
    run(out_path, {"x": RNG.standard_normal((2, 64)).astype(np.float32)})


# ------------------------------------------------------------------- 9g: demo
def test_demo_leaves_nothing_behind_unless_asked(tmp_path, capsys, monkeypatch):
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = cli(capsys, "demo")
    assert code == 0, err
    assert "outputs removed (pass --out DIR to keep them)" in out
    assert list(work.iterdir()) == []
    code, out, err = cli(capsys, "demo", "--json")
    result = json.loads(out)
    assert code == 0 and result["kept"] is False and result["output"] is None and list(work.iterdir()) == []
    code, out, err = cli(capsys, "demo", "--out", "kept")
    assert code == 0 and "outputs kept in kept" in out
    assert sorted(p.name for p in (work / "kept").iterdir()) == ["example.int4-block128.onnx", "example.onnx"]
    kept = work / "kept" / "example.int4-block128.onnx"
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in make_session(kept).get_inputs()}
    assert all(np.isfinite(y).all() for y in run(kept, feeds))


# --------------------------------------------------------------- 9h: --format help
def test_format_help_names_every_fallback(capsys):
    code, out, _ = cli(capsys, "convert", "--conv-bits", "bits", "--embedding-bits", "bits", "--gemm-bits", "bits", "--help")
    text = " ".join(out.split())
    assert code == 0
    for fragment in ("GatherBlockQuantized for embeddings", "else QDQ", "else ox-quant's custom op",
                     "needs its library at run time", "stays float and is listed as skipped"):
        assert fragment in text, fragment
