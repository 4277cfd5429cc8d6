"""Real-world graph shapes: Gemm, embeddings (and tied weights), Conv, Constant-node
weights and constant chains, shared weights, subgraphs, fp16/bf16, selection, recipes.

Each converted model runs on ONNX Runtime and matches a float computation with the
dequantized weights (relative error <= 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.config import Block, Format, PerChannel, PerTensor, QuantConfig
from ox_quant.core.quantize import quantize
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.inspect import inspect_model
from ox_quant.pipeline.policy import UNIFORM
from ox_quant.pipeline.selection import Selection
from tests.helpers import relative_error, run

RNG = np.random.default_rng(11)


def weight(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.1).astype(np.float32)


def save(path, nodes, inputs, outputs, inits=(), opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def fin(name, *shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def deq_kn(w_kn: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Dequantized ``W[K, N]`` (float64)."""
    return quantize(w_kn, config).dequantize()


def initializer_names(path) -> list[str]:
    return [t.name for t in onnx.load(str(path)).graph.initializer]


# ------------------------------------------------------------------------ Gemm
@pytest.mark.parametrize("fmt", [Format.AUTO, Format.QDQ])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta, with_bias", [(1.0, 1.0, True), (1.0, 0.5, True), (0.7, 1.0, False), (1.0, 1.0, False)])
def test_gemm(tmp_path, fmt, trans_b, alpha, beta, with_bias):
    k, n = 96, 40
    w = weight(k, n)
    bias = weight(n)
    stored = w.T.copy() if trans_b else w
    inits = [numpy_helper.from_array(stored, "B")] + ([numpy_helper.from_array(bias, "C")] if with_bias else [])
    node = helper.make_node("Gemm", ["x", "B"] + (["C"] if with_bias else []), ["y"], transB=trans_b, alpha=alpha, beta=beta)
    src = save(tmp_path / "gemm.onnx", [node], [fin("x", 5, k)], [fin("y", 5, n)], inits)
    config = QuantConfig(granularity=Block(32), format=fmt)
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    (entry,) = report.quantized
    assert entry.op == "Gemm" and entry.shape == (k, n)
    assert entry.format == ("matmulnbits" if fmt is Format.AUTO else "qdq")  # alpha: a Mul after MatMulNBits
    x = RNG.standard_normal((5, k)).astype(np.float32)
    ref = alpha * (x.astype(np.float64) @ deq_kn(w, config)) + (beta * bias if with_bias else 0)
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], ref) <= 1e-5


# ------------------------------------------------------------------ embeddings
def embedding_model(path, v=64, d=96, tied=None):
    """ids -> Gather(table) -> [tied: MatMul(h, Transpose(table)) or Gemm(h, table, transB=1)]."""
    table = weight(v, d)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
    outputs = [fin("h", 2, 3, d)]
    if tied == "transpose":
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
        outputs = [fin("logits", 2, 3, v)]
    elif tied == "gemm":
        nodes += [helper.make_node("Reshape", ["h", "flat"], ["h2"]),
                  helper.make_node("Gemm", ["h2", "table"], ["logits"], transB=1, name="lm_head")]
        outputs = [fin("logits", 6, v)]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1, d], np.int64), "flat")]
    inputs = [fin("ids", 2, 3, dtype=TensorProto.INT64)]
    return save(path, nodes, inputs, outputs, inits), table


IDS = np.array([[0, 5, 63], [7, 7, 1]], dtype=np.int64)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_embedding_gather_block_quantized(tmp_path, bits, symmetric):
    src, table = embedding_model(tmp_path / "e.onnx")
    config = QuantConfig(bits=bits, granularity=Block(32), symmetric=symmetric)
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config)).quantized
    assert (entry.op, entry.format, entry.shape) == ("Gather", "gather_block_quantized", (96, 64))
    deq = deq_kn(table.T, config).T  # [V, D]
    (h,) = run(tmp_path / "q.onnx", {"ids": IDS})
    assert relative_error(h, deq[IDS]) <= 1e-6


@pytest.mark.parametrize("granularity", [PerChannel(), Block(48)])
def test_embedding_falls_back_to_dequantize_gather(tmp_path, granularity):
    src, table = embedding_model(tmp_path / "e.onnx")
    config = QuantConfig(bits=8, granularity=granularity)
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config)).quantized
    assert entry.format == "qdq" and "GatherBlockQuantized" in entry.format_reason
    (h,) = run(tmp_path / "q.onnx", {"ids": IDS})
    assert relative_error(h, deq_kn(table.T, config).T[IDS]) <= 1e-6


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_tied_embedding_is_quantized_once_and_stored_once(tmp_path, tied):
    v, d = 64, 96
    src, table = embedding_model(tmp_path / "e.onnx", v, d, tied=tied)
    config = QuantConfig(symmetric=True, bits=4, granularity=Block(32))
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    (entry,) = report.quantized
    assert entry.op == ("Gather+MatMul" if tied == "transpose" else "Gather+Gemm")
    assert entry.format == "gather_block_quantized+matmulnbits" and "tied" in entry.format_reason
    # the output's bytes prove one copy: the 4-bit table plus scales, and nothing table-sized besides
    model = onnx.load(str(tmp_path / "q.onnx"))
    sizes = {t.name: len(t.raw_data) for t in model.graph.initializer}
    quantized_bytes = v * d // 2
    assert sum(1 for s in sizes.values() if s >= quantized_bytes) == 1, sizes
    assert tmp_path.joinpath("q.onnx").stat().st_size < 1.5 * quantized_bytes + 4 * v * (d // 32) + 2000
    # bytes reported = bytes stored: codes + scales (the int64 shape constants are graph plumbing)
    stored = sum(len(t.raw_data) for t in model.graph.initializer if t.data_type != TensorProto.INT64)
    assert entry.stored_bytes == stored == quantized_bytes + 4 * v * (d // 32)
    (info,) = inspect_model(tmp_path / "q.onnx").quantized
    assert info.stored_bytes == stored
    deq = deq_kn(table.T, config).T  # [V, D]
    (logits,) = run(tmp_path / "q.onnx", {"ids": IDS})
    h = deq[IDS].astype(np.float64)
    ref = h @ deq.T if tied == "transpose" else h.reshape(-1, d) @ deq.T
    assert relative_error(logits, ref) <= 1e-5


# ----------------------------------------------------------------------- Conv
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("requested", [Block(128), PerChannel(), PerTensor()])
def test_conv_per_output_channel(tmp_path, bits, requested):
    w = weight(16, 3, 3, 3)
    b = weight(16)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1])
    src = save(tmp_path / "c.onnx", [node], [fin("x", 1, 3, 10, 10)], [fin("y", 1, 16, 10, 10)],
               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    config = QuantConfig(bits=bits, granularity=requested)
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config)).quantized
    expected = "tensor" if isinstance(requested, PerTensor) else "channel"
    assert (entry.op, entry.format, entry.granularity, entry.shape) == ("Conv", "qdq", expected, (27, 16))
    effective = QuantConfig(bits=bits, granularity=PerTensor() if expected == "tensor" else PerChannel())
    deq = deq_kn(w.reshape(16, -1).T, effective).T.reshape(w.shape).astype(np.float32)
    ref_path = save(tmp_path / "ref.onnx", [node], [fin("x", 1, 3, 10, 10)], [fin("y", 1, 16, 10, 10)],
                    [numpy_helper.from_array(deq, "W"), numpy_helper.from_array(b, "b")])
    x = RNG.standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], run(ref_path, {"x": x})[0].astype(np.float64)) <= 1e-5


def test_conv_two_bit_is_raised_to_four_with_reason(tmp_path):
    """No format holds a 2-bit Conv: it is written at 4 bits (not left float), and the report says so."""
    node = helper.make_node("Conv", ["x", "W"], ["y"])
    w = weight(4, 3, 3, 3)
    src = save(tmp_path / "c.onnx", [node], [fin("x", 1, 3, 8, 8)], [fin("y", 1, 4, 6, 6)],
               [numpy_helper.from_array(w, "W")])
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=QuantConfig(bits=2))).quantized
    assert (entry.op, entry.bits, entry.format) == ("Conv", 4, "qdq")
    assert "int2 raised to int4" in entry.config_reason and "Conv weights are written as QDQ" in entry.config_reason
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    deq = deq_kn(w.reshape(4, -1).T, QuantConfig(bits=4, granularity=PerChannel())).T.reshape(w.shape)
    ref = save(tmp_path / "ref.onnx", [node], [fin("x", 1, 3, 8, 8)], [fin("y", 1, 4, 6, 6)],
               [numpy_helper.from_array(deq.astype(np.float32), "W")])
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], run(ref, {"x": x})[0].astype(np.float64)) <= 1e-5


# ------------------------------------------- Constant nodes and constant chains
def test_constant_nodes_and_chains_are_folded(tmp_path):
    k, n = 64, 32
    w1, w2, w3 = weight(k, n), weight(n, k), weight(k * n)
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "c1")),
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        # W2 stored transposed, as fp16, behind Identity -> Cast -> Transpose
        helper.make_node("Identity", ["W2t16"], ["W2t16_id"]),
        helper.make_node("Cast", ["W2t16_id"], ["W2t"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W2t"], ["W2"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"]),
        # W3 flat, reshaped by a Constant shape
        helper.make_node("Constant", [], ["shape3"], value=numpy_helper.from_array(np.array([k, n], np.int64), "s")),
        helper.make_node("Reshape", ["W3flat", "shape3"], ["W3"]),
        helper.make_node("MatMul", ["h2", "W3"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w2.T.astype(np.float16), "W2t16"), numpy_helper.from_array(w3, "W3flat")]
    src = save(tmp_path / "c.onnx", nodes, [fin("x", 2, k)], [fin("y", 2, n)], inits)
    config = QuantConfig(granularity=Block(32))
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    assert sorted(q.name for q in report.quantized) == ["W1", "W2", "W3"]
    assert {q.format for q in report.quantized} == {"matmulnbits"}
    ops = [node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops == ["MatMulNBits"] * 3
    x = RNG.standard_normal((2, k)).astype(np.float32)
    w2_used = w2.astype(np.float16).astype(np.float32)
    ref = x.astype(np.float64) @ deq_kn(w1, config) @ deq_kn(w2_used, config) @ deq_kn(w3.reshape(k, n), config)
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], ref) <= 1e-5


# ------------------------------------------------- shared weights, subgraphs
def test_shared_weight_quantized_once(tmp_path):
    w = weight(64, 64)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    src = save(tmp_path / "s.onnx", nodes, [fin("x", 3, 64)], [fin("y", 3, 64)], [numpy_helper.from_array(w, "W")])
    for fmt in (Format.MATMULNBITS, Format.QDQ):
        config = QuantConfig(granularity=Block(32), format=fmt)
        report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
        assert len(report.quantized) == 1 and report.quantized[0].op == "MatMul"
        names = initializer_names(tmp_path / "q.onnx")
        assert len([n for n in names if n.startswith("W_Q")]) == 1, names
        x = RNG.standard_normal((3, 64)).astype(np.float32)
        d = deq_kn(w, config)
        assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], x.astype(np.float64) @ d @ d) <= 1e-5


def test_weights_inside_if_branches(tmp_path):
    k, n = 64, 32
    w_then, w_outer = weight(k, n), weight(k, n)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["yt"])], "then", [], [fin("yt", 2, n)],
        [numpy_helper.from_array(w_then, "Wt")])
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wo"], ["ye"])], "else", [], [fin("ye", 2, n)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    src = save(tmp_path / "if.onnx", [node], [fin("x", 2, k), fin("cond", dtype=TensorProto.BOOL)], [fin("y", 2, n)],
               [numpy_helper.from_array(w_outer, "Wo")])
    config = QuantConfig(granularity=Block(32))
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    assert sorted(q.name for q in report.quantized) == ["Wo", "Wt"]
    x = RNG.standard_normal((2, k)).astype(np.float32)
    for cond, w in ((True, w_then), (False, w_outer)):
        (y,) = run(tmp_path / "q.onnx", {"x": x, "cond": np.array(cond)})
        assert relative_error(y, x.astype(np.float64) @ deq_kn(w, config)) <= 1e-5


# ----------------------------------------------------------------- dtypes
@pytest.mark.parametrize("fmt", [Format.MATMULNBITS, Format.QDQ])
def test_fp16_model_gets_fp16_scales(tmp_path, fmt):
    w = weight(64, 48).astype(np.float16)
    src = save(tmp_path / "h.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
               [fin("x", 2, 64, dtype=TensorProto.FLOAT16)], [fin("y", 2, 48, dtype=TensorProto.FLOAT16)],
               [numpy_helper.from_array(w, "W")])
    config = QuantConfig(granularity=Block(32), format=fmt)
    convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    scales = [t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer if "scale" in t.name]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    x = RNG.standard_normal((2, 64)).astype(np.float16)
    ref = x.astype(np.float64) @ quantize(w.astype(np.float32), config, np.float16).dequantize()
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], ref) <= 2e-3  # fp16 accumulation


def test_bf16_model_uses_qdq_with_bf16_scales(tmp_path):
    import ml_dtypes

    w = weight(64, 32)
    w_bf16 = helper.make_tensor("W", TensorProto.BFLOAT16, [64, 32],
                                w.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
    src = save(tmp_path / "b.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
               [fin("x", 2, 64, dtype=TensorProto.BFLOAT16)], [fin("y", 2, 32, dtype=TensorProto.BFLOAT16)], [w_bf16])
    config = QuantConfig(symmetric=True, granularity=Block(32))
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config)).quantized
    assert entry.format == "qdq" and "bfloat16" in entry.format_reason
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    scale = next(t for t in model.graph.initializer if t.name.endswith("_scale"))
    assert scale.data_type == TensorProto.BFLOAT16
    # ONNX Runtime's CPU EP has no bfloat16 MatMul (nor for the input model), so check the
    # stored tensors: they decode to the reference dequantized weight.
    from ox_quant.core.packing import unpack_onnx_4bit_reference

    q_t = next(t for t in model.graph.initializer if t.name.endswith("_Q"))
    codes = unpack_onnx_4bit_reference(q_t.raw_data, 64 * 32, signed=True).reshape(64, 32).astype(np.float64)
    scales = np.frombuffer(scale.raw_data, dtype=ml_dtypes.bfloat16).astype(np.float64).reshape(2, 32)
    expected = quantize(w.astype(ml_dtypes.bfloat16).astype(np.float32), config, ml_dtypes.bfloat16).dequantize()
    np.testing.assert_array_equal(codes * np.repeat(scales, 32, axis=0), expected)


def test_rank3_weight_is_skipped_with_reason(tmp_path):
    src = save(tmp_path / "r.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
               [fin("x", 2, 3, 64)], [fin("y", 2, 3, 16)], [numpy_helper.from_array(weight(2, 64, 16), "W")])
    report = convert(src, tmp_path / "q.onnx")
    assert report.quantized == ()
    assert {s.name: s.reason for s in report.skipped} == {"W": "MatMul weight has rank 3, not 2"}
    x = RNG.standard_normal((2, 3, 64)).astype(np.float32)
    run(tmp_path / "q.onnx", {"x": x})


# -------------------------------------------------------------- selection
@pytest.fixture()
def mixed_model(tmp_path):
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h0"], name="embed"),
        helper.make_node("MatMul", ["h0", "layers.0.up"], ["h1"], name="up0"),
        helper.make_node("MatMul", ["h1", "layers.1.up"], ["h2"], name="up1"),
        helper.make_node("Gemm", ["h2flat", "head"], ["y"], transB=1, name="head"),
        helper.make_node("Reshape", ["h2", "shape"], ["h2flat"]),
        helper.make_node("MatMul", ["h1", "tiny"], ["t"], name="tiny"),
    ]
    nodes = nodes[:3] + [nodes[4], nodes[3], nodes[5]]
    inits = {
        "emb": weight(50, 64), "layers.0.up": weight(64, 128), "layers.1.up": weight(128, 64),
        "head": weight(10, 64), "tiny": weight(128, 16),
    }
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    tensors.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"))
    src = save(tmp_path / "mixed.onnx", nodes, [fin("ids", 2, 3, dtype=TensorProto.INT64)],
               [fin("y", 6, 10), fin("t", 2, 3, 16)], tensors)
    return src


def quantized_names(report):
    return sorted(q.name for q in report.quantized)


def skipped(report):
    return {s.name: s.reason for s in report.skipped}


def test_include_exclude_ops_and_min_elements(mixed_model, tmp_path):
    out = tmp_path / "q.onnx"
    config = QuantConfig(granularity=Block(16))
    every = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=config))
    assert quantized_names(every) == ["emb", "head", "layers.0.up", "layers.1.up", "tiny"]
    r = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=config, selection=Selection(include=(r"layers\.",))))
    assert quantized_names(r) == ["layers.0.up", "layers.1.up"]
    assert skipped(r)["emb"] == "not matched by --include"
    r = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=config, selection=Selection(include_ops=("MatMul", "Gemm"))))
    assert "emb" not in quantized_names(r) and "not selected" in skipped(r)["emb"]
    r = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=config, selection=Selection(min_elements=2100)))
    assert quantized_names(r) == ["emb", "layers.0.up", "layers.1.up"]
    assert skipped(r)["tiny"] == "2048 elements, fewer than --min-elements 2100"
    r = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=config, selection=Selection(exclude=("^up1$",))))
    assert skipped(r)["layers.1.up"] == "excluded by --exclude '^up1$'"  # node names match too
    run(out, {"ids": IDS % 50})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_mixed_precision(mixed_model, tmp_path, capsys, suffix):
    rules = [
        {"match": "emb|head", "bits": 8, "granularity": "channel"},
        {"match": r"layers\.0\.", "skip": True},
        {"match": "tiny", "op": "MatMul", "bits": 4, "block_size": 32, "format": "qdq", "symmetric": False},
    ]
    recipe = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        recipe.write_text(json.dumps({"rules": rules}))
    else:
        import yaml

        recipe.write_text(yaml.safe_dump({"rules": rules}))
    from ox_quant.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(mixed_model), "-o", str(tmp_path / "q.onnx"), "--block-size", "16", "--symmetric", "--recipe", str(recipe), "--json"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    report = json.loads(out)
    got = {q["name"]: (q["bits"], q["granularity"], q["block_size"], q["format"], q["symmetric"]) for q in report["quantized"]}
    assert got == {
        "emb": (8, "channel", -1, "qdq", True),
        "head": (8, "channel", -1, "qdq", True),
        "tiny": (4, "block", 32, "qdq", False),
        "layers.1.up": (4, "block", 16, "matmulnbits", True),
    }
    assert {s["name"]: s["reason"] for s in report["skipped"]} == {"layers.0.up": "skipped by the recipe"}
    run(tmp_path / "q.onnx", {"ids": IDS % 50})


def test_bad_recipe_is_one_line_error(mixed_model, tmp_path, capsys):
    from ox_quant.cli import main

    recipe = tmp_path / "r.json"
    for text, message in [("{not json", "not valid json"), ('[{"bits": 4}]', "'match' regex"),
                          ('[{"match": "x", "colour": 1}]', "unknown keys colour"),
                          ('[{"match": ".", "bits": 11}]', "bits must be between 2 and 8")]:
        recipe.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(mixed_model), "-o", str(tmp_path / "q.onnx"), "--recipe", str(recipe)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "q.onnx").exists()


def test_inspect_agrees_with_convert_on_every_format(mixed_model, tmp_path):
    """Stored bytes per weight, as inspect reads them back, equal what convert reported."""
    out = tmp_path / "q.onnx"
    recipe_rules = ({"match": "layers\\.1", "format": "qdq", "bits": 8, "granularity": "channel"},)
    import re as _re

    from ox_quant.pipeline.selection import Rule

    rules = tuple(Rule(_re.compile(r["match"]), None, False, {k: v for k, v in r.items() if k != "match"}) for r in recipe_rules)
    report = convert(mixed_model, out, ConvertOptions(policy=UNIFORM, config=QuantConfig(granularity=Block(16)), selection=Selection(rules=rules)))
    formats = {q.name: q.format for q in report.quantized}
    assert set(formats.values()) == {"gather_block_quantized", "matmulnbits", "qdq"}
    info = inspect_model(out)
    assert sorted(q.stored_bytes for q in info.quantized) == sorted(q.stored_bytes for q in report.quantized)
    assert {q.format for q in info.quantized} == set(formats.values())
    gathered = next(q for q in info.quantized if q.format == "gather_block_quantized")
    assert (gathered.bits, gathered.granularity, gathered.block_size, gathered.shape) == (4, "block", 16, (50, 64))
    assert info.bits_per_weight == pytest.approx(report.bits_per_weight)


def test_old_opset_model_is_upgraded_for_qdq(tmp_path):
    """Opset 12 (ReduceMean with an axes attribute): QDQ needs opset 21, so the whole graph
    is upgraded (axes become an input) before the weights are rewritten."""
    w = weight(64, 32)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["c"]), helper.make_node("MatMul", ["c", "W"], ["y"])]
    src = save(tmp_path / "op12.onnx", nodes, [fin("x", 2, 64)], [fin("y", 2, 32)], [numpy_helper.from_array(w, "W")],
               opset=12)
    config = QuantConfig(bits=4, granularity=PerChannel())
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(policy=UNIFORM, config=config))
    assert [q.format for q in report.quantized] == ["qdq"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert "DequantizeLinear" in [n.op_type for n in model.graph.node]
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    c = x.astype(np.float64) - x.astype(np.float64).mean(axis=-1, keepdims=True)
    assert relative_error(run(tmp_path / "q.onnx", {"x": x})[0], c @ deq_kn(w, config)) <= 1e-5
