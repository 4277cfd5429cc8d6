"""Every configuration the converter writes runs on ONNX Runtime (CPU EP) and matches a
float64 computation with the dequantized weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig
from ox_quant.core.quantize import quantize
from ox_quant.errors import OxQuantError
from ox_quant.pipeline.convert import ConvertOptions, convert
from tests.helpers import matmul_model, random_weights, relative_error, run

K0, K1, N1 = 200, 96, 48  # K0 is not a multiple of 32, 48, 64 or 128

QDQ_CASES = [
    (Format.QDQ, g, bits, sym)
    for g, bits, sym in itertools.product(
        [PerTensor(), PerChannel(), Block(32), Block(48), Block(96), ChannelGroup(8)], [4, 8], [True, False]
    )
]
NBITS_CASES = [
    (Format.MATMULNBITS, Block(bs), bits, sym)
    for bs, bits, sym in itertools.product([16, 32, 64], [2, 4, 8], [True, False])
]
CUSTOM_CASES = [
    (Format.CUSTOM, g, bits, sym)
    for g, bits, sym in itertools.product(
        [PerTensor(), PerChannel(), Block(32), Block(48), ChannelGroup(8)], [3, 5, 6, 7], [True, False]
    )
] + [(Format.CUSTOM, Block(16), bits, False) for bits in (2, 4, 8)]
AUTO_CASES = [
    (Format.AUTO, Block(32), 4, True),
    (Format.AUTO, PerChannel(), 8, True),
    (Format.AUTO, ChannelGroup(16), 4, False),
    (Format.AUTO, Block(64), 2, False),
    (Format.AUTO, Block(32), 3, True),
    (Format.AUTO, PerChannel(), 2, False),
]


def _id(case):
    fmt, g, bits, sym = case
    return f"{fmt.value}-{g}-int{bits}-{'sym' if sym else 'asym'}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(0)
    weights = random_weights(rng, K0, K1, N1)
    path = matmul_model(tmp_path_factory.mktemp("m") / "model.onnx", weights)
    x = rng.standard_normal((2, 3, K0)).astype(np.float32)
    return path, weights, x


def needs_custom_ops(fmt, bits, granularity):
    from ox_quant.runtime.custom_ops import library_available

    uses_custom = fmt is Format.CUSTOM or bits not in (2, 4, 8) or (bits == 2 and not isinstance(granularity, Block))
    if uses_custom and not library_available():
        pytest.skip("custom-op library not built (ox-quant build-ops)")


@pytest.mark.parametrize("case", QDQ_CASES + NBITS_CASES + CUSTOM_CASES + AUTO_CASES, ids=_id)
def test_ort_matches_float64_dequantized_reference(model, tmp_path, case):
    path, weights, x = model
    fmt, granularity, bits, symmetric = case
    needs_custom_ops(fmt, bits, granularity)
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric, format=fmt)
    out = tmp_path / "q.onnx"
    report = convert(path, out, ConvertOptions(config=config))
    assert [q.name for q in report.quantized] == ["W0", "W1"]
    expected_format = {Format.QDQ: "qdq", Format.MATMULNBITS: "matmulnbits", Format.CUSTOM: "custom"}.get(fmt)
    if expected_format:
        assert {q.format for q in report.quantized} == {expected_format}

    (y,) = run(out, {"x": x})
    reference = x.astype(np.float64)
    for w in weights.values():
        reference = reference @ quantize(w, config).dequantize(np.float64)
    assert y.shape == reference.shape
    assert np.isfinite(y).all()
    assert relative_error(y, reference) <= 1e-5


def test_auto_picks_matmulnbits_when_ort_accepts_and_qdq_otherwise(model, tmp_path):
    path, _, _ = model
    cases = {
        Block(64): "matmulnbits",
        Block(48): "qdq",
        PerChannel(): "qdq",
        ChannelGroup(8): "qdq",
    }
    for granularity, fmt in cases.items():
        report = convert(path, tmp_path / "a.onnx", ConvertOptions(config=QuantConfig(granularity=granularity)))
        assert {q.format for q in report.quantized} == {fmt}, granularity
        if fmt == "qdq":
            assert "MatMulNBits" in report.quantized[0].format_reason


@pytest.mark.parametrize(
    "config, message",
    [
        (QuantConfig(bits=2, format=Format.QDQ), "--format qdq cannot express"),
        (QuantConfig(bits=4, granularity=PerChannel(), format=Format.MATMULNBITS), "--format matmulnbits cannot"),
        (QuantConfig(bits=4, granularity=Block(100), format=Format.MATMULNBITS), "power of two"),
        (QuantConfig(bits=4, granularity=Block(512)), "larger than K=200 for every weight"),
    ],
)
def test_inexpressible_configs_are_refused_and_nothing_written(model, tmp_path, config, message):
    path, _, _ = model
    out = tmp_path / "refused.onnx"
    with pytest.raises(OxQuantError, match=message):
        convert(path, out, ConvertOptions(config=config))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", [Format.AUTO, Format.QDQ, Format.CUSTOM])
def test_block_up_to_twice_k_is_one_partial_block(model, tmp_path, fmt):
    """K=96 < block 128: one partial block per column, as ONNX Runtime's quantizer pads K to the block."""
    path, weights, x = model
    config = QuantConfig(granularity=Block(128), format=fmt)
    report = convert(path, tmp_path / "b.onnx", ConvertOptions(config=config))
    assert [q.name for q in report.quantized] == ["W0", "W1"] and not report.skipped
    (y,) = run(tmp_path / "b.onnx", {"x": x})
    ref = x.astype(np.float64)
    for name in ("W0", "W1"):
        ref = ref @ quantize(weights[name], config).dequantize()
    assert relative_error(y, ref) <= 1e-5


def test_block_twice_k_or_more_skips_with_reason(model, tmp_path):
    path, _, x = model
    report = convert(path, tmp_path / "b.onnx", ConvertOptions(config=QuantConfig(granularity=Block(256))))
    assert [q.name for q in report.quantized] == ["W0"]
    assert [(s.name, s.reason) for s in report.skipped] == [("W1", "block size 256 is larger than K=96")]
    (y,) = run(tmp_path / "b.onnx", {"x": x})
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bits, granularity", [(3, Block(32)), (5, PerChannel()), (2, PerChannel()), (7, ChannelGroup(16))])
def test_auto_uses_the_custom_op_where_no_standard_format_fits(model, tmp_path, bits, granularity):
    path, _, _ = model
    report = convert(path, tmp_path / "c.onnx", ConvertOptions(config=QuantConfig(bits=bits, granularity=granularity)))
    assert {q.format for q in report.quantized} == {"custom"}
    assert "custom op" in report.quantized[0].format_reason
    import onnx

    model_proto = onnx.load(str(tmp_path / "c.onnx"))
    assert {o.domain: o.version for o in model_proto.opset_import}.get("ox_quant") == 1
    assert {n.domain for n in model_proto.graph.node} == {"ox_quant"}


def test_custom_op_accuracy_level_is_passed_through(model, tmp_path):
    """--accuracy-level 4 reaches ox_quant.MatMulNBits: int8 activations, ~1e-2 relative error."""
    from ox_quant.runtime.custom_ops import library_available

    if not library_available():
        pytest.skip("custom-op library not built (ox-quant build-ops)")
    path, weights, x = model
    config = QuantConfig(bits=3, granularity=Block(32), accuracy_level=4)
    convert(path, tmp_path / "a4.onnx", ConvertOptions(config=config))
    import onnx

    nodes = onnx.load(str(tmp_path / "a4.onnx")).graph.node
    assert [next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes] == [4, 4]
    reference = x.astype(np.float64)
    for w in weights.values():
        reference = reference @ quantize(w, config).dequantize()
    (y,) = run(tmp_path / "a4.onnx", {"x": x})
    error = relative_error(y, reference)
    assert 1e-6 < error < 2e-2  # int8 activations: not exact, but close
