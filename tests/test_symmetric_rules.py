"""The three symmetric rules through every format: what ONNX Runtime computes from the
written model equals the slow reference's dequantized weights (negative scales included),
and the rule is selectable from the command line and from a recipe."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig, SymmetricRule
from ox_quant.core.quantize import quantize_reference
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.policy import UNIFORM
from tests.helpers import matmul_model, relative_error, run

K, N = 96, 40
RULES = list(SymmetricRule)


def heavy_tailed(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Student-t weights: the rules differ most where a few weights stick out."""
    return (rng.standard_t(2.5, shape) * 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(5)
    w = heavy_tailed(rng, K, N)
    w[:, 3] = 0.0  # an all-zero channel
    path = matmul_model(tmp_path_factory.mktemp("rules") / "m.onnx", {"W0": w})
    return path, w, rng.standard_normal((2, 3, K)).astype(np.float32)


CASES = [
    (Format.MATMULNBITS, Block(32), 2),
    (Format.MATMULNBITS, Block(32), 4),
    (Format.MATMULNBITS, Block(16), 8),
    (Format.QDQ, Block(32), 4),
    (Format.QDQ, PerChannel(), 8),
    (Format.QDQ, PerTensor(), 4),
    (Format.QDQ, ChannelGroup(8), 4),
    (Format.CUSTOM, Block(32), 3),
    (Format.CUSTOM, PerChannel(), 5),
    (Format.CUSTOM, ChannelGroup(8), 2),
]


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].value}-{c[1]}-int{c[2]}")
def test_written_model_decodes_to_the_reference(model, tmp_path, rule, case):
    fmt, granularity, bits = case
    if fmt is Format.CUSTOM:
        from ox_quant.runtime.custom_ops import library_available

        if not library_available():
            pytest.skip("custom-op library not built (ox-quant build-ops)")
    path, w, x = model
    config = QuantConfig(symmetric=True, bits=bits, granularity=granularity, format=fmt, symmetric_rule=rule)
    report = convert(path, tmp_path / "q.onnx", ConvertOptions(config=config))
    assert [(q.format, q.symmetric) for q in report.quantized] == [(fmt.value, True)]
    expected = x.astype(np.float64) @ quantize_reference(w, config).dequantize()
    (y,) = run(tmp_path / "q.onnx", {"x": x})
    assert relative_error(y, expected) <= 1e-5


def stored_scales(path) -> np.ndarray:
    model = onnx.load(str(path))
    return np.concatenate([numpy_helper.to_array(t).ravel() for t in model.graph.initializer if "scale" in t.name])


@pytest.mark.parametrize("fmt", [Format.MATMULNBITS, Format.QDQ])
def test_signed_scales_are_written_as_negative_numbers(model, tmp_path, fmt):
    """The signed rules store negative scales (the largest weight is positive in about half
    the blocks); absmax never does."""
    path, _, _ = model
    for rule, negative in [(SymmetricRule.SIGNED, True), (SymmetricRule.MIN_ERROR, True),
                           (SymmetricRule.MIN_ERROR_CLIP, True), (SymmetricRule.ABSMAX, False)]:
        config = QuantConfig(symmetric=True, bits=4, granularity=Block(32), format=fmt, symmetric_rule=rule)
        convert(path, tmp_path / f"{rule}.onnx", ConvertOptions(config=config))
        assert bool((stored_scales(tmp_path / f"{rule}.onnx") < 0).any()) is negative, rule


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_decodes_to_the_reference(tmp_path, rule, bits):
    rng = np.random.default_rng(bits)
    v, d = 64, 96
    table = heavy_tailed(rng, v, d)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, d])],
                              [numpy_helper.from_array(table, "table")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "e.onnx"))
    config = QuantConfig(symmetric=True, bits=bits, granularity=Block(32), symmetric_rule=rule)
    (entry,) = convert(tmp_path / "e.onnx", tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM)).quantized
    assert entry.format == "gather_block_quantized"
    ids = np.array([[0, 5, 63], [7, 7, 1]], dtype=np.int64)
    deq = quantize_reference(table.T, config).dequantize().T  # [V, D]
    (h,) = run(tmp_path / "q.onnx", {"ids": ids})
    assert relative_error(h, deq[ids]) <= 1e-6


def test_conv_weights_follow_the_rule(tmp_path):
    rng = np.random.default_rng(2)
    w = heavy_tailed(rng, 16, 8, 3, 3)
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [numpy_helper.from_array(w, "W")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "c.onnx"))
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    (y_float,) = run(tmp_path / "c.onnx", {"x": x})
    errors = {}
    for rule in RULES:
        config = QuantConfig(symmetric=True, bits=4, granularity=PerChannel(), symmetric_rule=rule)
        convert(tmp_path / "c.onnx", tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))
        w_kn = w.reshape(16, -1).T  # K = Cin*kh*kw, N = Cout
        deq = quantize_reference(w_kn, config).dequantize().T.reshape(w.shape).astype(np.float32)
        onnx.save(helper.make_model(helper.make_graph(
            [node], "g", list(graph.input), list(graph.output), [numpy_helper.from_array(deq, "W")]),
            opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(tmp_path / "ref.onnx"))
        (y,) = run(tmp_path / "q.onnx", {"x": x})
        (y_ref,) = run(tmp_path / "ref.onnx", {"x": x})
        assert relative_error(y, y_ref.astype(np.float64)) <= 1e-5, rule
        errors[rule] = float(((y - y_float) ** 2).sum())
    assert len(set(errors.values())) >= 3  # the rules write different models


def test_cli_flag_and_recipe_key_select_the_rule(model, tmp_path, capsys):
    from ox_quant.cli import main

    path, w, _ = model

    def convert_cli(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(path), "-o", str(tmp_path / "q.onnx"), "--block-size", "32", "--symmetric", "--json", *args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured

    def scales():
        return stored_scales(tmp_path / "q.onnx")

    for rule in RULES:
        code, _ = convert_cli("--symmetric-rule", rule.value)
        assert code == 0
        expected = quantize_reference(w, QuantConfig(symmetric=True, granularity=Block(32), symmetric_rule=rule)).scales
        np.testing.assert_array_equal(scales(), expected.T.ravel())
    code, _ = convert_cli()
    assert code == 0
    np.testing.assert_array_equal(scales(), quantize_reference(w, QuantConfig(symmetric=True, granularity=Block(32))).scales.T.ravel())

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"match": ".", "symmetric_rule": "absmax"}]))
    code, _ = convert_cli("--recipe", str(recipe))
    assert code == 0
    absmax = quantize_reference(w, QuantConfig(symmetric=True, granularity=Block(32), symmetric_rule=SymmetricRule.ABSMAX)).scales
    np.testing.assert_array_equal(scales(), absmax.T.ravel())

    (tmp_path / "q.onnx").unlink()
    recipe.write_text(json.dumps([{"match": ".", "symmetric_rule": "biggest"}]))
    code, captured = convert_cli("--recipe", str(recipe))
    assert code == 1 and captured.err.count("\n") == 1
    assert "symmetric_rule must be one of min-error, min-error-clip, signed, absmax, got 'biggest'" in captured.err
    assert not (tmp_path / "q.onnx").exists()
    code, captured = convert_cli("--symmetric-rule", "biggest")
    assert code == 2 and "biggest" in captured.err  # click's usage error
    assert not (tmp_path / "q.onnx").exists()
