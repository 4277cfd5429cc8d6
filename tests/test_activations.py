"""Activation quantization: what ONNX Runtime fuses, fused output against a float64 simulation of
the same Q/DQ arithmetic, every mode running, SmoothQuant's fold, and bad calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.act_quant import dynamic_qparams, fake_quant, per_token_fake_quant
from ox_quant.core.calibrate import Calibrator
from ox_quant.core.config import Format, PerChannel, QuantConfig
from ox_quant.ir.modelio import load_model, save_model_atomically
from ox_quant.ir.sites import find_sites
from ox_quant.pipeline.activations import ActivationOptions, smooth, smooth_scales
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.policy import UNIFORM
from ox_quant.runtime.fusion import optimized_op_types
from ox_quant.runtime.session import make_session
from tests.helpers import run_cli

K, N = 64, 48
W8 = QuantConfig(bits=8, granularity=PerChannel(), symmetric=False, format=Format.QDQ)


def _save(path: Path, nodes, inputs, outputs, inits, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def mlp_model(path: Path, seed: int = 0, outlier: float = 20.0) -> Path:
    """LayerNorm -> two MatMuls on one tensor (Q/K-like) -> Mul -> MatMul -> Gemm with a bias."""
    rng = np.random.default_rng(seed)
    inits = {
        "ln_s": rng.standard_normal(K).astype(np.float32), "ln_b": (rng.standard_normal(K) * 0.1).astype(np.float32),
        "w1": (rng.standard_normal((K, N)) / 8).astype(np.float32), "w2": (rng.standard_normal((K, N)) / 8).astype(np.float32),
        "w4": (rng.standard_normal((N, N)) / 8).astype(np.float32),
        "w3": (rng.standard_normal((16, N)) / 8).astype(np.float32), "b3": rng.standard_normal(16).astype(np.float32),
        "shp": np.array([-1, N], np.int64),
    }
    inits["ln_s"][3] = outlier  # an outlier channel, as LLM activations have
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["a"]), helper.make_node("MatMul", ["ln", "w2"], ["b"]),
        helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("MatMul", ["ab", "w4"], ["c"]),
        helper.make_node("Reshape", ["c", "shp"], ["r"]),
        helper.make_node("Gemm", ["r", "w3", "b3"], ["y"], transB=1),
    ]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 16])], inits)


def conv_model(path: Path) -> Path:
    rng = np.random.default_rng(1)
    inits = {"c1": (rng.standard_normal((8, 3, 3, 3)) / 4).astype(np.float32), "b1": rng.standard_normal(8).astype(np.float32),
             "c2": (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "c1", "b1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Conv", ["hr", "c2", "b2"], ["y0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y0"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])], inits)


def matmul_model(path: Path) -> Path:
    rng = np.random.default_rng(2)
    inits = {"w": (rng.standard_normal((K, N)) / 8).astype(np.float32)}
    return _save(path, [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, K])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, N])], inits)


def feeds_for(path: Path, count: int = 4, seed: int = 5, scale: float = 2.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    return [{"x": (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(count)]


def _convert(src: Path, dst: Path, feeds, config: QuantConfig = W8, **act) -> object:
    options = ConvertOptions(config=config, policy=UNIFORM, activations=ActivationOptions(feeds=feeds, **act))
    return convert(src, dst, options)


def _float_out(path: Path, feed) -> np.ndarray:
    return make_session(path).run(None, feed)[0]


def _fused_out(path: Path, feed) -> np.ndarray:
    return make_session(path, exact=False).run(None, feed)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def test_static_uint8_is_fused_into_integer_kernels(tmp_path):
    src = mlp_model(tmp_path / "m.onnx")
    feeds = feeds_for(src)
    report = _convert(src, tmp_path / "q.onnx", feeds, mode="uint8")
    ops = optimized_op_types(tmp_path / "q.onnx")
    # ab's MatMul feeds r's pair through a Reshape: ORT moves the Q up and makes it a QLinearMatMul
    assert ops["MatMulIntegerToFloat"] == 2 and ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1, ops
    assert dict(report.kernels) == {"MatMulIntegerToFloat": 2, "QLinearMatMul": 1, "QGemm": 1}
    assert not ops["MatMul"] and not ops["Gemm"]
    assert {a.tensor for a in report.activations} == {"ln", "ab", "r"}
    assert _rel(_fused_out(tmp_path / "q.onnx", feeds[0]), _float_out(src, feeds[0])) < 0.05


def test_conv_with_output_pair_is_fused_into_qlinearconv(tmp_path):
    src = conv_model(tmp_path / "c.onnx")
    feeds = feeds_for(src)
    report = _convert(src, tmp_path / "q.onnx", feeds, mode="uint8", calibrator=Calibrator("percentile", 99.99))
    ops = optimized_op_types(tmp_path / "q.onnx")
    assert ops["QLinearConv"] == 2, ops
    assert all(a.output_pairs == 1 for a in report.activations)
    # fused (integer kernels) against the same Q/DQ arithmetic unfused: within one output step
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    step = max(float(numpy_helper.to_array(t)) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
               if t.name == "y0_scale")
    assert np.abs(_fused_out(tmp_path / "q.onnx", feeds[0]) - unfused).max() <= step * 1.001
    assert _rel(_fused_out(tmp_path / "q.onnx", feeds[0]), _float_out(src, feeds[0])) < 0.05


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("mode", ["uint8", "int8", "dynamic", "token", "channel"])
def test_output_equals_float64_simulation(tmp_path, mode):
    """ORT's output (fused where it fuses) equals the same Q/DQ arithmetic in float64: x quantized
    and dequantized, times the dequantized weight; and that simulation is within the rounding
    bound of the float model (|dx| <= s/2 per element inside the calibrated range)."""
    src = matmul_model(tmp_path / "m.onnx")
    feeds = feeds_for(src, 6, scale=1.0)
    act = {"uint8": {"mode": "uint8"}, "int8": {"mode": "int8"}, "dynamic": {"mode": "dynamic"},
           "token": {"mode": "int8", "granularity": "token"}, "channel": {"mode": "uint8", "granularity": "channel"}}[mode]
    _convert(src, tmp_path / "q.onnx", feeds, **act)
    t = _initializers(tmp_path / "q.onnx")
    w_dq = (t["w_Q"].astype(np.float64) - t["w_zp"].astype(np.float64)) * t["w_scale"].astype(np.float64)
    x = feeds[0]["x"]
    if mode in ("uint8", "int8"):
        scale, zp = t["x_scale"], t["x_zero_point"]
        xq = fake_quant(x, scale, zp, mode)
        bound = float(scale) / 2
    elif mode == "dynamic":
        scale, zp = dynamic_qparams(x)
        xq = fake_quant(x, scale, zp, "uint8")
        bound = float(scale) / 2
    elif mode == "token":
        xq = per_token_fake_quant(x)
        bound = float(np.abs(x).max()) / 127 / 2
    else:
        scale, zp = t["x_channel_scale"], t["x_channel_zero_point"]
        xq = fake_quant(x, scale, zp.astype(np.int64), "uint8", axis=-1)
        bound = float(scale.max()) / 2
    simulated = xq @ w_dq
    # token/channel are float ops that ORT does not fuse; its default session would turn the
    # weight's DQ + MatMul into MatMulNBits with its own int8 activations (accuracy level 4)
    session = make_session(tmp_path / "q.onnx", exact=mode in ("token", "channel"))
    got = session.run(None, feeds[0])[0].astype(np.float64)
    assert np.abs(got - simulated).max() <= 1e-5 * np.abs(simulated).max(), mode
    assert np.abs(xq - x).max() <= bound * (1 + 1e-6)
    rounding = np.abs(x) @ np.abs(w_dq - t_w(src)) + bound * np.abs(w_dq).sum(axis=0)
    assert (np.abs(simulated - x.astype(np.float64) @ t_w(src)) <= rounding + 1e-9).all()


def t_w(src: Path) -> np.ndarray:
    return _initializers(src)["w"].astype(np.float64)


@pytest.mark.parametrize("act", [
    {"mode": "uint8", "calibrator": Calibrator("entropy")},
    {"mode": "uint8", "calibrator": Calibrator("mse")},
    {"mode": "int8", "calibrator": Calibrator("percentile", 99.9)},
    {"mode": "uint8", "granularity": "channel"},
    {"mode": "dynamic"},
    {"mode": "int8", "granularity": "token"},
    {"mode": "uint8", "smooth_alpha": 0.5},
])
def test_every_mode_runs_and_stays_close(tmp_path, act):
    """Without an outlier channel (clipping calibrators clip a lone outlier channel hard: that
    is SmoothQuant's case, tested below with it)."""
    src = mlp_model(tmp_path / "m.onnx", outlier=1.0)
    feeds = feeds_for(src)
    report = _convert(src, tmp_path / "q.onnx", feeds, **act)
    assert report.activations
    for feed in feeds[:2]:
        assert _rel(_fused_out(tmp_path / "q.onnx", feed), _float_out(src, feed)) < 0.1


def test_smoothquant_helps_on_an_outlier_channel(tmp_path):
    src = mlp_model(tmp_path / "m.onnx")
    feeds = feeds_for(src)
    errors = {}
    for alpha in (None, 0.5):
        _convert(src, tmp_path / f"q{alpha}.onnx", feeds, mode="uint8", smooth_alpha=alpha)
        errors[alpha] = max(_rel(_fused_out(tmp_path / f"q{alpha}.onnx", f), _float_out(src, f)) for f in feeds)
    assert errors[0.5] < errors[None]


def test_smoothquant_fold_keeps_the_float_graph(tmp_path):
    """diag(s) W and 1/s folded into LayerNorm (w1, w2), into the previous MatMul's columns?
    (no: ab is a Mul output, so a Mul is inserted) and before the Gemm: outputs equal <= 1e-5."""
    src = mlp_model(tmp_path / "m.onnx")
    feeds = feeds_for(src)
    model = load_model(src)
    sites, _ = find_sites(model)
    used = {n for n in model.graph.initializers} | {v.name for node in model.graph for v in node.outputs if v.name}
    done, count = smooth(model, sites, 0.5, feeds, used)
    assert count == len(feeds)
    hows = {d.tensor: d.how for d in done}
    assert hows["ln"].startswith("folded into LayerNormalization") and "Mul" in hows["ab"]
    out = tmp_path / "smoothed.onnx"
    save_model_atomically(model, out, False)
    for feed in feeds:
        ref, got = _float_out(src, feed), _float_out(out, feed)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # the outlier channel of ln is smaller relative to the rest after smoothing
    ln_s = _initializers(out)["ln_s"]
    assert abs(ln_s[3]) / np.median(np.abs(ln_s)) < 20.0 / np.median(np.abs(_initializers(src)["ln_s"]))


def test_smoothquant_fold_into_previous_matmul(tmp_path):
    rng = np.random.default_rng(3)
    inits = {"v": (rng.standard_normal((K, K)) / 8).astype(np.float32), "bv": rng.standard_normal(K).astype(np.float32),
             "w": (rng.standard_normal((K, N)) / 8).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "v"], ["h0"]), helper.make_node("Add", ["h0", "bv"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    src = _save(tmp_path / "mm.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, K])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, N])], inits)
    feeds = feeds_for(src)
    model = load_model(src)
    sites, _ = find_sites(model)
    w_site = [s for s in sites if s.name == "w"]
    done, _ = smooth(model, w_site, 0.8, feeds, {"x", "y", "h", "h0"})
    assert "columns and bias of MatMul" in done[0].how
    save_model_atomically(model, tmp_path / "s.onnx", False)
    ref, got = _float_out(src, feeds[0]), _float_out(tmp_path / "s.onnx", feeds[0])
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_smooth_scales_formula():
    x = np.array([4.0, 0.0, 1.0, 9.0])
    w = np.array([1.0, 2.0, 0.0, 0.25])
    s = smooth_scales(x, w, 0.5)
    expected = [4.0 ** 0.5 / 1.0 ** 0.5, 1.0, 1.0, 9.0 ** 0.5 / 0.25 ** 0.5]
    np.testing.assert_allclose(s, expected)


def test_recipe_rule_leaves_an_activation_float(tmp_path, capsys):
    src = mlp_model(tmp_path / "m.onnx")
    (tmp_path / "cal").mkdir()
    for i, feed in enumerate(feeds_for(src)):
        np.savez(tmp_path / "cal" / f"f{i}.npz", **feed)
    (tmp_path / "r.json").write_text('{"rules": [{"match": "^w3$", "activations": false}]}')
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "q.onnx"), "--activations", "uint8",
                             "--calibration", str(tmp_path / "cal"), "--recipe", str(tmp_path / "r.json"), "--gemm-bits", "8",
                             "--json")
    assert code == 0, err
    import json

    data = json.loads(out)["activations"]
    assert {a["tensor"] for a in data["quantized"]} == {"ln", "ab"}
    assert any(s["name"] == "w3" and "recipe" in s["reason"] for s in data["skipped"])
    assert {q["name"] for q in json.loads(out)["quantized"]} >= {"w1", "w2", "w3", "w4"}  # w3's weight still int8
    assert make_session(tmp_path / "q.onnx").run(None, feeds_for(src)[0])


def test_position_rules_leave_the_first_and_last_layer_float(tmp_path, capsys):
    """``position: first`` / ``last`` name the weights read first and last in graph order (w1,
    the Gemm's w3), with no pattern to write; a ``match`` narrows the weights they count."""
    import json

    src = mlp_model(tmp_path / "m.onnx")
    (tmp_path / "cal").mkdir()
    for i, feed in enumerate(feeds_for(src)):
        np.savez(tmp_path / "cal" / f"f{i}.npz", **feed)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"position": "first", "activations": False},
                                            {"position": "last", "activations": False},
                                            {"match": "^w[24]$", "position": "last", "bits": 4, "block_size": 16}]}))
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "q.onnx"), "--activations", "uint8",
                             "--calibration", str(tmp_path / "cal"), "--recipe", str(recipe), "--gemm-bits", "8", "--json")
    assert code == 0, err
    report = json.loads(out)
    left_float = {s["name"] for s in report["activations"]["skipped"] if "recipe" in s["reason"]}
    assert left_float == {"w1", "w3"}
    bits = {q["name"]: q["bits"] for q in report["quantized"]}
    assert bits["w4"] == 4 and bits["w2"] == 8  # the last of w2, w4 in graph order
    assert make_session(tmp_path / "q.onnx").run(None, feeds_for(src)[0])


@pytest.mark.parametrize("rule, message", [({"position": "middle"}, "position must be one of first, last"),
                                           ({"bits": 4}, "a 'match' regex or a 'position'")])
def test_bad_position_rule_is_one_line(tmp_path, capsys, rule, message):
    import json

    src = mlp_model(tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text(json.dumps({"rules": [rule]}))
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "q.onnx"), "--recipe", str(tmp_path / "r.json"))
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def _bad_feeds(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / f"cal_{kind}"
    d.mkdir()
    good = np.zeros((2, 5, K), np.float32)
    if kind == "empty":
        return d
    arrays = {"name": {"input_ids": good}, "shape": {"x": np.zeros((2, K), np.float32)},
              "dtype": {"x": np.zeros((2, 5, K), np.int64)}, "nan": {"x": np.full((2, 5, K), np.nan, np.float32)}}[kind]
    np.savez(d / "f0.npz", **arrays)
    return d


@pytest.mark.parametrize("kind", ["name", "shape", "dtype", "nan", "empty"])
def test_bad_calibration_data_is_one_line_exit_1(tmp_path, capsys, kind):
    src = mlp_model(tmp_path / "m.onnx")
    before = src.read_bytes()
    out = tmp_path / "q.onnx"
    code, stdout, err = run_cli(capsys, "convert", str(src), "-o", str(out), "--activations", "uint8",
                                "--calibration", str(_bad_feeds(tmp_path, kind)))
    assert code == 1
    assert err.startswith("ox-quant: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and src.read_bytes() == before


@pytest.mark.parametrize("args, needle", [
    (["--activations", "uint8"], "needs calibration data"),
    (["--calibrate", "entropy"], "add --activations"),
    (["--activations", "uint8", "--activation-granularity", "channel", "--calibrate", "entropy", "--calibration", "."],
     "minmax only"),
    (["--activations", "dynamic", "--activation-granularity", "channel"], "needs calibrated ranges"),
    (["--activations", "uint8", "--calibrate", "kl", "--calibration", "."], "unknown calibrator"),
])
def test_activation_flag_errors(tmp_path, capsys, args, needle):
    src = mlp_model(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "q.onnx"), *args)
    assert code == 1 and needle in err, err
    assert not (tmp_path / "q.onnx").exists()


def test_default_weights_under_activations_are_int8_channel_qdq(tmp_path, capsys):
    """The policy is the weight-only one (Gemm float unless --gemm-bits): the Gemm's input stays float."""
    src = mlp_model(tmp_path / "m.onnx")
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "q.onnx"), "--activations", "dynamic",
                             "--json")
    assert code == 0, err
    import json

    quantized = json.loads(out)["quantized"]
    assert {(q["bits"], q["granularity"], q["format"]) for q in quantized} == {(8, "channel", "qdq")}
    model = ir.load(str(tmp_path / "q.onnx"))
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in model.graph) == 2
    assert {q["name"] for q in quantized} == {"w1", "w2", "w4"}


def test_per_layer_attributes_each_quantized_activation(tmp_path):
    """verify --per-layer runs the reference with one activation pair inserted at a time."""
    from ox_quant.verification.verify import verify

    src = mlp_model(tmp_path / "m.onnx", outlier=1.0)
    feeds = feeds_for(src)
    _convert(src, tmp_path / "q.onnx", feeds, mode="uint8")
    np.savez(tmp_path / "in.npz", **feeds[0])
    report = verify(src, tmp_path / "q.onnx", inputs=tmp_path / "in.npz", per_layer=True)
    assert report.layers is not None
    acts = {layer.weight: layer for layer in report.layers.layers if layer.format == "activation"}
    weights = {layer.weight for layer in report.layers.layers if layer.format == "qdq"}
    assert set(acts) == {"ln", "ab", "r"} and weights == {"w1", "w2", "w3", "w4"}
    assert not report.layers.unmatched
    whole = min(o.sqnr_db for o in report.outputs)
    for layer in acts.values():  # one activation alone costs less than all of them with the weights
        assert np.isfinite(layer.output_sqnr_db) and layer.output_sqnr_db > whole
