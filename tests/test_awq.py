"""AWQ: the scale and clipping searches held to their references, the float graph unchanged by
the folded input scales (every fold kind and the inserted Mul), the calibration output error
against round-to-nearest, and converted models run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ox_quant.algorithms.awq import (
    AWQ,
    clip_search,
    clip_search_reference,
    output_loss,
    search_scales,
    search_scales_reference,
)
from ox_quant.algorithms.base import InputScaler, SiteStats, scaled_stats
from ox_quant.algorithms.registry import get_quantizer
from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig
from ox_quant.core.quantize import quantize
from ox_quant.errors import OxQuantError
from ox_quant.ir.input_scales import apply_input_scales, input_groups
from ox_quant.ir.sites import find_sites
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.runtime.session import make_session
from tests.helpers import matmul_model, relative_error, run
from tests.test_gptq import calibration_rows, stats_of

GRANULARITIES = [PerTensor(), PerChannel(), Block(4), Block(3), ChannelGroup(2)]
F32 = np.dtype(np.float32)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 10), st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(2, 8), st.booleans(),
       st.sampled_from(GRANULARITIES), st.integers(0, 2**31 - 1))
def test_scale_search_matches_the_reference(k, widths, bits, symmetric, granularity, seed):
    rng = np.random.default_rng(seed)
    x = calibration_rows(rng, 4 * k + 3, k, outliers=min(2, k), dead=1 if k > 3 else 0)
    weights = [rng.standard_normal((k, n)).astype(np.float32) for n in widths]
    configs = [QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)] * len(weights)
    fast = search_scales(weights, configs, [F32] * len(weights), stats_of(x))
    ref = search_scales_reference(weights, configs, [F32] * len(weights), stats_of(x))
    assert fast[1] == ref[1]
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_allclose(fast[2], ref[2], rtol=1e-9, atol=1e-12)  # summation order only


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 10), st.integers(1, 5), st.integers(2, 8), st.booleans(), st.sampled_from(GRANULARITIES),
       st.sampled_from([np.float32, np.float16]), st.integers(0, 2**31 - 1))
def test_clip_search_matches_the_reference(k, n, bits, symmetric, granularity, scale_dtype, seed):
    rng = np.random.default_rng(seed)
    x = calibration_rows(rng, 4 * k + 3, k, outliers=min(2, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    h = x.T @ x / len(x)
    fast = clip_search(w, config, scale_dtype, h)
    ref = clip_search_reference(w, config, scale_dtype, h)
    np.testing.assert_array_equal(fast.codes, ref.codes)
    np.testing.assert_array_equal(fast.scales, ref.scales)
    np.testing.assert_array_equal(fast.zero_points, ref.zero_points)
    assert fast.scales.shape == quantize(w, config, scale_dtype=scale_dtype).scales.shape
    rtn = quantize(w, config, scale_dtype=scale_dtype).dequantize()
    assert output_loss(fast.dequantize() - w, h) <= output_loss(rtn - w, h)  # never worse than no clipping


def _awq_layer(ws, x, config):
    """AWQ of the weights ``ws`` that read ``x``: (s, quantized weights dequantized back to x's scale)."""
    stats = stats_of(x)
    s = AWQ().input_scales(ws, [config] * len(ws), [F32] * len(ws), stats)
    s = np.ones(x.shape[1]) if s is None else s
    inner = scaled_stats(stats, s)
    out = []
    for w in ws:
        scaled = (w.astype(np.float64) * s[:, None]).astype(np.float32)
        out.append(AWQ().quantize(scaled, config, F32, inner).dequantize() / s[:, None])
    return s, out


@pytest.mark.parametrize("granularity", [Block(32), Block(128), PerChannel()], ids=str)
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True)])
def test_awq_reduces_the_calibration_output_error(granularity, bits, symmetric):
    """Three weights sharing one input with outlier channels: ||X W - X W_q||^2 summed is below RTN's."""
    rng = np.random.default_rng(bits + 2 * symmetric)
    k = 256
    x = calibration_rows(rng, 1024, k, outliers=8, dead=2)
    ws = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for n in (64, 64, 32)]
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    s, deq = _awq_layer(ws, x, config)
    awq = sum(np.sum((x @ (d - w)) ** 2) for d, w in zip(deq, ws, strict=True))
    rtn = sum(np.sum((x @ (quantize(w, config).dequantize() - w)) ** 2) for w in ws)
    assert not np.allclose(s, 1.0)  # the outlier channels were scaled
    assert awq < 0.9 * rtn


# ----------------------------------------------------------------------------------
# The graph pass


def block_model(path, rng, k=32, m=48, opset=21):
    """LayerNorm -> q/k/v (one input) -> Sum -> o (its input also read by an Add: Mul inserted);
    decomposed RMSNorm (Mul by gamma) -> up (+bias) -> down -> extra (MatMul after MatMul)."""
    def w(name, a, b):
        return numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), name)

    def vec(name, n, base=1.0):
        return numpy_helper.from_array((base + 0.3 * rng.standard_normal(n)).astype(np.float32), name)

    inits = [vec("ln.scale", k), vec("ln.bias", k, 0.0), w("Wq", k, k), w("Wk", k, k), w("Wv", k, k), w("Wo", k, k),
             vec("gamma", k), w("Wu", k, m), vec("bu", m, 0.0), w("Wd", m, k), w("We", k, k),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"), numpy_helper.from_array(np.float32(1e-6), "eps")]
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "ln.scale", "ln.bias"], ["ln"], axis=-1, name="ln1"),
        n("MatMul", ["ln", "Wq"], ["q"], name="q_proj"), n("MatMul", ["ln", "Wk"], ["kk"], name="k_proj"),
        n("MatMul", ["ln", "Wv"], ["v"], name="v_proj"), n("Sum", ["q", "kk", "v"], ["qkv"]),
        n("MatMul", ["qkv", "Wo"], ["o"], name="o_proj"), n("Add", ["o", "qkv"], ["o2"]), n("Add", ["x", "o2"], ["h"]),
        n("Mul", ["h", "h"], ["sq"]), n("ReduceMean", ["sq", "axes"], ["ms"]), n("Add", ["ms", "eps"], ["mse"]),
        n("Sqrt", ["mse"], ["rms"]), n("Div", ["h", "rms"], ["normed"]), n("Mul", ["normed", "gamma"], ["g"]),
        n("MatMul", ["g", "Wu"], ["u"], name="up_proj"), n("Add", ["u", "bu"], ["ub"]),
        n("MatMul", ["ub", "Wd"], ["d"], name="down_proj"), n("MatMul", ["d", "We"], ["e"], name="extra"),
        n("Add", ["h", "e"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


SITE_INPUTS = {"Wq": "ln", "Wk": "ln", "Wv": "ln", "Wo": "qkv", "Wu": "g", "Wd": "ub", "We": "d"}


def site_inputs(path, x):
    """Each weight's input rows ``[rows, K]``, from ONNX Runtime with the inputs exposed as outputs."""
    model = onnx.load(str(path))
    names = sorted(set(SITE_INPUTS.values()))
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    exposed = path.with_name(path.stem + ".exposed.onnx")
    onnx.save(model, str(exposed))
    got = dict(zip(names, make_session(exposed).run(names, {"x": x}), strict=True))
    return {w: got[t].reshape(-1, got[t].shape[-1]).astype(np.float64) for w, t in SITE_INPUTS.items()}


def test_folded_float_graph_equals_the_original(tmp_path):
    """Random scales folded by every route: ORT's output of the float graph moves <= 1e-5."""
    rng = np.random.default_rng(0)
    src = block_model(tmp_path / "block.onnx", rng)
    model = ir.load(str(src))
    sites, _ = find_sites(model)
    groups, left_out = input_groups(sites)
    assert not left_out
    assert [sorted(s.name for s in g.sites) for g in groups] == [["Wk", "Wq", "Wv"], ["Wo"], ["Wu"], ["Wd"], ["We"]]
    used: set[str] = set()
    how = [apply_input_scales(g, np.exp(rng.standard_normal(g.k)), used) for g in groups]
    assert how[0].startswith("folded into LayerNormalization")
    assert how[1] == "inserted Mul by 1/s"  # qkv is also read by an Add
    assert how[2].startswith("folded into the norm weight of Mul")
    assert how[3].startswith("folded into the columns and bias of MatMul up_proj")
    assert how[4].startswith("folded into the columns of MatMul down_proj")
    out = tmp_path / "folded.onnx"
    ir.save(model, str(out))
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    expected = run(src, {"x": x})[0]
    assert relative_error(run(out, {"x": x})[0], expected.astype(np.float64)) <= 1e-5
    assert not np.allclose(onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(out)).graph.initializer if t.name == "Wq")),
        onnx.numpy_helper.to_array(next(t for t in onnx.load(str(src)).graph.initializer if t.name == "Wq")))


def test_shared_norm_weight_is_not_folded(tmp_path):
    """A gamma read by two Muls cannot take 1/s for one of them: a Mul is inserted instead."""
    rng = np.random.default_rng(1)
    k = 16
    w = (rng.standard_normal((k, k)) / 4).astype(np.float32)
    gamma = numpy_helper.from_array((1 + rng.standard_normal(k) * 0.2).astype(np.float32), "gamma")
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"]), helper.make_node("Mul", ["x2", "gamma"], ["b"]),
             helper.make_node("MatMul", ["a", "W"], ["ya"]), helper.make_node("Add", ["ya", "b"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, k]) for n in ("x", "x2", "y")]
    graph = helper.make_graph(nodes, "g", vi[:2], vi[2:], [gamma, numpy_helper.from_array(w, "W")])
    src = tmp_path / "shared.onnx"
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(src))
    model = ir.load(str(src))
    groups, _ = input_groups(find_sites(model)[0])
    assert apply_input_scales(groups[0], np.exp(rng.standard_normal(k)), set()) == "inserted Mul by 1/s"
    out = tmp_path / "out.onnx"
    ir.save(model, str(out))
    feeds = {"x": rng.standard_normal((2, k)).astype(np.float32), "x2": rng.standard_normal((2, k)).astype(np.float32)}
    assert relative_error(run(out, feeds)[0], run(src, feeds)[0].astype(np.float64)) <= 1e-5


def test_registered_with_the_input_scale_hook():
    awq = get_quantizer("awq")
    assert isinstance(awq, InputScaler) and not isinstance(get_quantizer("gptq"), InputScaler)
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    config = QuantConfig(granularity=PerChannel())
    np.testing.assert_array_equal(awq.quantize(w, config, F32, None).codes, quantize(w, config).codes)
    assert AWQ().input_scales([w], [config], [F32], SiteStats(np.ones(8), 3)) is None  # no statistics: no scales
    with pytest.raises(OxQuantError, match="awq needs calibration data"):
        search_scales([w], [config], [F32], SiteStats(np.ones(8), 3))


# ----------------------------------------------------------------------------------
# Converted models


def _dequantized_from(path):
    from ox_quant.verification.per_layer import _load, _Tensors, quantized_weights

    proto = onnx.load(str(path))
    found, problems = quantized_weights(proto, _Tensors(_load(path), path.parent))
    assert not problems
    by_node = {q.node.name: q.values.astype(np.float64) for q in found}
    return by_node, proto


def test_converted_chain_runs_in_onnx_runtime(tmp_path):
    """x -> W0 -> W1 with AWQ: a Mul by 1/s0 on the graph input, 1/s1 folded into W0's columns;
    ORT's output is the float64 product of the model's dequantized weights, and closer to float than RTN."""
    rng = np.random.default_rng(4)
    k, mid_dim, n = 64, 48, 32
    weights = {"W0": (rng.standard_normal((k, mid_dim)) / 8).astype(np.float32),
               "W1": (rng.standard_normal((mid_dim, n)) / 7).astype(np.float32)}
    src = matmul_model(tmp_path / "m.onnx", weights)
    x = calibration_rows(rng, 3 * 60, k, outliers=3).astype(np.float32).reshape(-1, 3, k)
    x0 = x.reshape(-1, k).astype(np.float64)
    stats = {"W0": stats_of(x0), "W1": stats_of(x0 @ weights["W0"])}
    config = QuantConfig(bits=4, granularity=Block(16), algorithm="awq", format=Format.MATMULNBITS)
    out = tmp_path / "awq.onnx"
    report = convert(src, out, ConvertOptions(config=config, calibration=stats))
    assert [i.how for i in report.scaled_inputs] == ["inserted Mul by 1/s", "folded into the columns of MatMul matmul_W0"]
    got = run(out, {"x": x})[0]
    deq, proto = _dequantized_from(out)
    inv = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("inv_input_scale"))
    expected = (x.astype(np.float64) * inv.astype(np.float64)) @ deq["matmul_W0_MatMulNBits"] @ deq["matmul_W1_MatMulNBits"]
    assert relative_error(got, expected) < 1e-5
    reference = x.astype(np.float64) @ weights["W0"] @ weights["W1"]
    rtn = tmp_path / "rtn.onnx"
    convert(src, rtn, ConvertOptions(config=QuantConfig(bits=4, granularity=Block(16), format=Format.MATMULNBITS)))
    assert np.sum((got - reference) ** 2) < np.sum((run(rtn, {"x": x})[0] - reference) ** 2)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_converted_block_model_stays_close_to_float(tmp_path, fmt):
    """The block model (every fold route) converted with AWQ at int4 block:16 runs in ORT and is
    closer to the float output than round-to-nearest on held-out inputs."""
    rng = np.random.default_rng(5)
    src = block_model(tmp_path / "block.onnx", rng)
    calib = (rng.standard_normal((8, 5, 32)) * np.where(np.arange(32) % 11 == 0, 8.0, 1.0)).astype(np.float32)
    stats = {name: stats_of(rows) for name, rows in site_inputs(src, calib).items()}
    config = QuantConfig(bits=4, granularity=Block(16), format=Format(fmt))
    awq_out, rtn_out = tmp_path / "awq.onnx", tmp_path / "rtn.onnx"
    report = convert(src, awq_out, ConvertOptions(config=QuantConfig(**{**config.__dict__, "algorithm": "awq"}),
                                                  calibration=stats))
    assert len(report.scaled_inputs) + len(report.unscaled) >= 1
    convert(src, rtn_out, ConvertOptions(config=config))
    held_out = (rng.standard_normal((4, 5, 32)) * np.where(np.arange(32) % 11 == 0, 8.0, 1.0)).astype(np.float32)
    ref = run(src, {"x": held_out})[0].astype(np.float64)
    awq_err = np.sum((run(awq_out, {"x": held_out})[0] - ref) ** 2)
    rtn_err = np.sum((run(rtn_out, {"x": held_out})[0] - ref) ** 2)
    assert awq_err < rtn_err


def test_awq_without_calibration_is_a_clear_error(tmp_path):
    src = matmul_model(tmp_path / "m.onnx", {"W0": np.ones((32, 16), np.float32)})
    out = tmp_path / "o.onnx"
    with pytest.raises(OxQuantError, match=r"--algorithm awq needs calibration data \(--calibration\)"):
        convert(src, out, ConvertOptions(config=QuantConfig(granularity=Block(16), algorithm="awq")))
    assert not out.exists()


def test_cli_end_to_end_folds_and_beats_rtn(tmp_path, capsys):
    """``convert --algorithm awq --calibration DIR`` on the block model: the LayerNorm and RMSNorm
    folds are used, and ORT's output on held-out feeds is closer to float than RTN's."""
    import json

    from tests.helpers import run_cli
    from tests.test_gptq import _feeds

    rng = np.random.default_rng(8)
    src = block_model(tmp_path / "block.onnx", rng)
    feeds = _feeds(tmp_path / "feeds", rng, 6, (2, 5, 32), outlier_every=11)
    outs = {}
    for algorithm in ("rtn", "awq"):
        outs[algorithm] = tmp_path / f"{algorithm}.onnx"
        code, out, err = run_cli(capsys, "convert", str(src), "-o", str(outs[algorithm]), "--algorithm", algorithm,
                                 "--calibration", str(feeds), "--granularity", "block:16", "--json")
        assert code == 0, err
        report = json.loads(out)
    folds = " | ".join(i["fold"] for i in report["input_scales"])
    assert "LayerNormalization" in folds or "norm weight" in folds, folds
    held = (rng.standard_normal((4, 5, 32)) * np.where(np.arange(32) % 11 == 0, 10.0, 1.0)).astype(np.float32)
    ref = run(src, {"x": held})[0].astype(np.float64)
    err = {a: float(np.sum((run(p, {"x": held})[0] - ref) ** 2)) for a, p in outs.items()}
    assert err["awq"] < err["rtn"]


def test_cli_awq_without_calibration_is_one_line(tmp_path, capsys):
    from tests.helpers import run_cli
    from tests.verify_support import assert_one_line_error

    src = matmul_model(tmp_path / "m.onnx", {"W0": np.ones((32, 16), np.float32)})
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--algorithm", "awq",
                           "--granularity", "block:16")
    assert_one_line_error(code, err, "awq needs calibration")
    assert not (tmp_path / "o.onnx").exists()
