"""Tied embedding tables and the other weights read through a Transpose or a Gemm: the
default layouts run fused kernels (no DequantizeLinear of a whole weight per step), every
written model runs on ONNX Runtime and matches the float64 reference of the dequantized
weights, and the bytes reported are the bytes stored."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.config import Block, Format, PerChannel, QuantConfig
from ox_quant.core.dequant import dequantize_matmulnbits
from ox_quant.core.quantize import quantize
from ox_quant.errors import OxQuantError
from ox_quant.formats.tied import TIED_FORMAT
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.inspect import inspect_model
from ox_quant.pipeline.policy import UNIFORM
from tests.helpers import relative_error, run

RNG = np.random.default_rng(5)


def fin(name, *shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def save(path, nodes, inputs, outputs, inits):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def tied_model(path, v, d, head="transpose", ids_shape=(2, 3), bias=None):
    """``ids -> Gather(T) = h`` and ``logits`` = ``h @ T.T`` through ``Transpose+MatMul``,
    ``Gemm(transB=1)`` (h flattened to 2-D) or both; outputs ``h`` and the logits."""
    table = (RNG.standard_normal((v, d)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(table, "T"), numpy_helper.from_array(np.array([-1, d], np.int64), "flat")]
    nodes = [helper.make_node("Gather", ["T", "ids"], ["h"], name="embed")]
    outputs = [fin("h", *ids_shape, d)]
    if head in ("transpose", "both"):
        nodes += [helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "Tt"], ["logits"], name="lm_head")]
        outputs.append(fin("logits", *ids_shape, v))
    if head in ("gemm", "both"):
        gemm_in = ["h2", "T"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "C"))
            gemm_in.append("C")
        nodes += [helper.make_node("Reshape", ["h", "flat"], ["h2"]),
                  helper.make_node("Gemm", gemm_in, ["logits2"], transB=1, name="lm_head2")]
        outputs.append(fin("logits2", math.prod(ids_shape), v))
    src = save(path, nodes, [fin("ids", *ids_shape, dtype=TensorProto.INT64)], outputs, inits)
    return src, table


def check_tied_run(path, table_deq: np.ndarray, ids: np.ndarray, head: str, bias=None) -> None:
    outs = run(path, {"ids": ids})
    h = table_deq[ids]
    assert outs[0].shape == h.shape and relative_error(outs[0], h) <= 1e-6
    flat = h.reshape(-1, table_deq.shape[1])
    expected = {"transpose": [h @ table_deq.T], "gemm": [flat @ table_deq.T], "both": [h @ table_deq.T, flat @ table_deq.T]}[head]
    if bias is not None:
        expected[-1] = expected[-1] + bias
    for got, ref in zip(outs[1:], expected, strict=True):
        assert relative_error(got, ref) <= 1e-5


def stored_weight_bytes(path) -> int:
    """Bytes of every initializer except int64 shape/index constants."""
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer if t.data_type != TensorProto.INT64)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("d, block", [(96, 32), (80, 32)])  # D a multiple of the block, and not
def test_tied_table_shares_one_packed_tensor(tmp_path, bits, symmetric, d, block):
    v = 40
    src, table = tied_model(tmp_path / "t.onnx", v, d, head="both")
    config = QuantConfig(bits=bits, granularity=Block(block), symmetric=symmetric)
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))
    (entry,) = report.quantized
    assert (entry.op, entry.format, entry.shape) == ("Gather+MatMul+Gemm", TIED_FORMAT, (d, v))
    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "DequantizeLinear" not in ops and "Transpose" not in ops and "Gather" not in ops
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1
    # both kernels read the same codes tensor, and the lookup reads MatMulNBits' scales reshaped
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    (lookup,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert {n.input[1] for n in nbits} == {lookup.input[0]} and len({n.input[2] for n in nbits}) == 1
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[lookup.input[2]].op_type == "Reshape" and producer[lookup.input[2]].input[0] == nbits[0].input[2]

    deq = quantize(table.T, config).dequantize().T  # float64 [V, D]
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zp = tensors[nbits[0].input[3]] if len(nbits[0].input) > 3 else None
    stored = dequantize_matmulnbits(tensors[nbits[0].input[1]], tensors[nbits[0].input[2]], zp,
                                    k=d, n=v, bits=bits, block_size=block)
    np.testing.assert_allclose(stored.T, deq, rtol=0, atol=1e-6)
    for ids in (np.array([[0, 5, 39], [7, 7, 1]], np.int64),):
        check_tied_run(tmp_path / "q.onnx", deq, ids, "both")

    nb = math.ceil(d / block)
    expected = v * nb * block * bits // 8 + v * nb * 4 + (0 if symmetric else v * math.ceil(nb * bits / 8) + v * nb)
    assert entry.stored_bytes == stored_weight_bytes(tmp_path / "q.onnx") == expected
    (info,) = inspect_model(tmp_path / "q.onnx").quantized
    assert (info.stored_bytes, info.format, info.shape) == (expected, TIED_FORMAT, (d, v))
    assert report.bits_per_weight == pytest.approx(expected * 8 / (v * d)) == info.bits_per_weight


@pytest.mark.parametrize("ids_shape", [(5,), (1, 1), (2, 2, 3)])
def test_tied_lookup_keeps_the_ids_shape(tmp_path, ids_shape):
    src, table = tied_model(tmp_path / "t.onnx", 48, 64, head="transpose", ids_shape=ids_shape)
    config = QuantConfig(granularity=Block(32))
    convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))
    ids = RNG.integers(0, 48, ids_shape).astype(np.int64)
    check_tied_run(tmp_path / "q.onnx", quantize(table.T, config).dequantize().T, ids, "transpose")


def test_tied_gemm_bias_and_accuracy_level(tmp_path):
    bias = (RNG.standard_normal(48) * 0.1).astype(np.float32)
    src, table = tied_model(tmp_path / "t.onnx", 48, 64, head="gemm", ids_shape=(1, 3), bias=bias)
    config = QuantConfig(granularity=Block(32), accuracy_level=1)
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert entry.format == TIED_FORMAT
    assert entry.stored_bytes == stored_weight_bytes(tmp_path / "q.onnx") - bias.nbytes  # the float bias is not counted
    (node,) = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert helper.get_node_attr_value(node, "accuracy_level") == 1
    ids = np.array([[3, 47, 0]], np.int64)
    check_tied_run(tmp_path / "q.onnx", quantize(table.T, config).dequantize().T, ids, "gemm", bias=bias)


def test_tied_falls_back_to_one_dequantize_with_reason(tmp_path):
    src, table = tied_model(tmp_path / "t.onnx", 48, 64, head="transpose")
    config = QuantConfig(bits=8, granularity=PerChannel())
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert entry.format == "qdq" and "tied weight" in entry.format_reason and "channel" in entry.format_reason
    check_tied_run(tmp_path / "q.onnx", quantize(table.T, config).dequantize().T, np.array([[1, 2, 3], [47, 0, 1]], np.int64), "transpose")
    with pytest.raises(OxQuantError, match="--format matmulnbits: .*block size must be a power of two"):
        convert(src, tmp_path / "q3.onnx",
                ConvertOptions(config=QuantConfig(bits=4, granularity=Block(24), format=Format.MATMULNBITS), policy=UNIFORM))
    assert not (tmp_path / "q3.onnx").exists()


def test_weight_read_through_transpose_becomes_matmulnbits(tmp_path):
    """``MatMul(x, Transpose(W))`` twice, one Transpose each (a lone Transpose is folded into
    the initializer before planning)."""
    k, n = 64, 40
    w_nk = (RNG.standard_normal((n, k)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("Transpose", ["W"], ["Wt2"]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"]), helper.make_node("MatMul", ["x2", "Wt2"], ["y2"])]
    src = save(tmp_path / "t.onnx", nodes, [fin("x", 3, k), fin("x2", 1, 2, k)], [fin("y", 3, n), fin("y2", 1, 2, n)],
               [numpy_helper.from_array(w_nk, "W")])
    config = QuantConfig(granularity=Block(32))
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert (entry.name, entry.format, entry.shape) == ("W", "matmulnbits", (k, n))
    ops = [node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops == ["MatMulNBits", "MatMulNBits"]
    deq = quantize(w_nk.T, config).dequantize()
    x, x2 = RNG.standard_normal((3, k)).astype(np.float32), RNG.standard_normal((1, 2, k)).astype(np.float32)
    y, y2 = run(tmp_path / "q.onnx", {"x": x, "x2": x2})
    assert relative_error(y, x @ deq) <= 1e-5 and relative_error(y2, x2 @ deq) <= 1e-5
    (info,) = inspect_model(tmp_path / "q.onnx").quantized  # one weight, stored once
    assert info.stored_bytes == entry.stored_bytes == stored_weight_bytes(tmp_path / "q.onnx")


def test_default_writes_no_dequantize_where_a_fused_kernel_exists(tmp_path):
    """Default convert of MatMul, Gemm (with bias), an untied embedding, a tied table and a
    Transpose-read projection: every weight in a fused ONNX Runtime kernel."""
    v, d = 64, 128
    table, emb = (RNG.standard_normal((v, d)) * 0.1).astype(np.float32), (RNG.standard_normal((v, d)) * 0.1).astype(np.float32)
    w1, w2 = (RNG.standard_normal((d, d)) * 0.1).astype(np.float32), (RNG.standard_normal((d, d)) * 0.1).astype(np.float32)
    head, bias = (RNG.standard_normal((v, d)) * 0.1).astype(np.float32), (RNG.standard_normal(v) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["h0"]), helper.make_node("Gather", ["E", "ids"], ["e0"]),
        helper.make_node("Add", ["h0", "e0"], ["h1"]), helper.make_node("MatMul", ["h1", "W1"], ["h2"]),
        helper.make_node("Reshape", ["h2", "flat"], ["h3"]), helper.make_node("Gemm", ["h3", "W2", "b2"], ["h4"]),
        helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]), helper.make_node("MatMul", ["h4", "Tt"], ["y1"]),
        helper.make_node("Transpose", ["H"], ["Ht"], perm=[1, 0]), helper.make_node("MatMul", ["h4", "Ht"], ["y2"]),
        helper.make_node("Add", ["y2", "c"], ["y3"]),
    ]
    arrays = {"T": table, "E": emb, "W1": w1, "W2": w2, "b2": np.zeros(d, np.float32), "H": head, "c": bias,
              "flat": np.array([-1, d], np.int64)}
    src = save(tmp_path / "m.onnx", nodes, [fin("ids", 1, 4, dtype=TensorProto.INT64)], [fin("y1", 4, v), fin("y3", 4, v)],
               [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    config = QuantConfig(granularity=Block(128))  # the CLI's --block-size 128
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))
    formats = {q.name: q.format for q in report.quantized}
    assert formats == {"T": TIED_FORMAT, "E": "gather_block_quantized", "W1": "matmulnbits", "W2": "matmulnbits",
                       "Ht": "matmulnbits"}  # H's Transpose is folded into the initializer Ht
    ops = {node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert not ops & {"DequantizeLinear", "Gather", "Gemm", "MatMul", "Transpose"}, ops
    dq = {name: quantize(a.T if name in ("T", "E", "H") else a, config).dequantize() for name, a in arrays.items()
          if name in formats or name == "H"}
    ids = np.array([[0, 9, 63, 9]], np.int64)
    h1 = dq["T"].T[ids] + dq["E"].T[ids]
    h4 = (h1 @ dq["W1"]).reshape(-1, d) @ dq["W2"]
    y1, y3 = run(tmp_path / "q.onnx", {"ids": ids})
    assert relative_error(y1, h4 @ dq["T"]) <= 1e-5 and relative_error(y3, h4 @ dq["H"] + bias) <= 1e-5
    info = inspect_model(tmp_path / "q.onnx")
    assert sorted(q.stored_bytes for q in info.quantized) == sorted(q.stored_bytes for q in report.quantized)


@pytest.mark.parametrize("trans_a, alpha, beta, bias", [
    (1, 1.0, 1.0, "const"), (0, 0.7, 0.5, "input"), (1, 1.5, 2.0, "matrix"), (0, 1.0, 0.5, "scalar"), (1, 0.5, 1.0, None),
])
def test_every_gemm_becomes_matmulnbits(tmp_path, trans_a, alpha, beta, bias):
    """``transA``, ``alpha`` and a bias that is a graph input, ``[M, N]`` or a scalar: small
    nodes around MatMulNBits, never a DequantizeLinear of the weight."""
    m, k, n = 5, 64, 48
    w = (RNG.standard_normal((k, n)) * 0.1).astype(np.float32)
    c = {"const": RNG.standard_normal(n), "input": RNG.standard_normal(n), "matrix": RNG.standard_normal((m, n)),
         "scalar": np.array(0.3), None: None}[bias]
    inits = [numpy_helper.from_array(w, "W")]
    inputs = [fin("a", *((k, m) if trans_a else (m, k)))]
    if bias == "input":
        inputs.append(fin("c", n))
    elif c is not None:
        inits.append(numpy_helper.from_array(c.astype(np.float32), "c"))
    node = helper.make_node("Gemm", ["a", "W"] + (["c"] if c is not None else []), ["y"], transA=trans_a, alpha=alpha, beta=beta)
    src = save(tmp_path / "g.onnx", [node], inputs, [fin("y", m, n)], inits)
    config = QuantConfig(granularity=Block(32))
    (entry,) = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert entry.format == "matmulnbits"
    ops = [x.op_type for x in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "MatMulNBits" in ops and not {"DequantizeLinear", "Gemm"} & set(ops)
    a = RNG.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    feed = {"a": a} | ({"c": c.astype(np.float32)} if bias == "input" else {})
    ref = alpha * ((a.T if trans_a else a).astype(np.float64) @ quantize(w, config).dequantize())
    if c is not None:
        ref = ref + beta * c.astype(np.float32).astype(np.float64)
    assert relative_error(run(tmp_path / "q.onnx", feed)[0], ref) <= 1e-5
    assert entry.stored_bytes == inspect_model(tmp_path / "q.onnx").quantized[0].stored_bytes


def test_per_layer_attributes_the_tied_table(tmp_path):
    """``verify --per-layer`` finds the float table behind the reference's Transpose and
    puts the dequantized table there (both of its uses, as in the candidate)."""
    from ox_quant import verify
    from ox_quant.ir.examples import llm_shaped_model

    src = tmp_path / "llm.onnx"
    llm_shaped_model(src, layers=1, hidden=128, mlp=256, vocab=300, tied=True)
    config = QuantConfig(granularity=Block(64))
    (entry, *_) = convert(src, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert (entry.name, entry.format) == ("embed.weight", TIED_FORMAT)
    report = verify(src, tmp_path / "q.onnx", per_layer=True)
    assert report.layers.unmatched == ()
    (table,) = [layer for layer in report.layers.layers if layer.weight == "embed.weight"]
    assert (table.format, table.shape) == ("matmulnbits", (300, 128))  # the reference table, [V, D]
    weight = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(src)).graph.initializer if t.name == "embed.weight"))
    deq = quantize(weight.T, config).dequantize()
    expected = 10 * np.log10(np.sum(weight.astype(np.float64) ** 2) / np.sum((weight - deq.T) ** 2))
    assert table.weight_sqnr_db == pytest.approx(expected, abs=1e-3)
