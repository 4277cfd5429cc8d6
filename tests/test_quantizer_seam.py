"""The quantizer seam: choosing parameters apart from applying them, the algorithm registry,
and the calibration slot of ``ConvertOptions`` reaching the quantizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ox_quant.algorithms import registry
from ox_quant.algorithms.base import SiteStats
from ox_quant.algorithms.rtn import RoundToNearest
from ox_quant.core.config import Block, ChannelGroup, PerChannel, PerTensor, QuantConfig
from ox_quant.core.quantize import choose_qparams, expand_groups, quantize, quantize_reference, quantize_with
from ox_quant.errors import OxQuantError
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.selection import apply_overrides
from ox_quant.runtime.custom_ops import library_available
from tests.helpers import matmul_model, random_weights, relative_error, run

GRANULARITIES = [PerTensor(), PerChannel(), Block(8), Block(5), ChannelGroup(3)]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 24), st.integers(1, 12), st.integers(2, 8), st.booleans(),
    st.sampled_from(GRANULARITIES), st.integers(0, 2**31 - 1),
)
def test_rtn_composition_matches_the_reference(k, n, bits, symmetric, granularity, seed):
    """choose_qparams then quantize_with is the slow reference, parameter for parameter."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    ref = quantize_reference(w, config)
    qparams = choose_qparams(w, config)
    np.testing.assert_array_equal(qparams.scales, ref.scales)
    np.testing.assert_array_equal(qparams.zero_points, ref.zero_points)
    np.testing.assert_array_equal(quantize_with(w, qparams, config), ref.codes)
    got = RoundToNearest().quantize(w, config, np.dtype(np.float32), None)
    np.testing.assert_array_equal(got.codes, ref.codes)


def test_quantize_with_applies_given_parameters():
    """Codes follow the parameters handed in, not ones recomputed from the weight."""
    w = np.array([[0.5], [-1.0], [2.0]], dtype=np.float32)
    config = QuantConfig(symmetric=True, bits=4, granularity=PerChannel())
    qparams = choose_qparams(w, config)
    halved = type(qparams)(qparams.scales * 2, qparams.zero_points)
    codes = quantize_with(w, halved, config).astype(int) - config.mid
    scale = float(halved.scales[0, 0])
    assert codes.ravel().tolist() == [int(np.clip(np.round(x / scale), -7, 7)) for x in w.ravel()]


def test_unknown_algorithm_is_a_clear_error(tmp_path):
    with pytest.raises(OxQuantError, match=r"unknown quantization algorithm 'obq': choose from .*rtn"):
        registry.get_quantizer("obq")
    with pytest.raises(OxQuantError, match=r"recipe rule 2: unknown quantization algorithm 'spqr'"):
        apply_overrides(QuantConfig(), {"algorithm": "spqr"}, "recipe rule 2")
    assert apply_overrides(QuantConfig(), {"algorithm": "rtn"}).algorithm == "rtn"
    src = matmul_model(tmp_path / "m.onnx", random_weights(np.random.default_rng(0), 64, 32))
    with pytest.raises(OxQuantError, match="unknown quantization algorithm 'quip'"):
        convert(src, tmp_path / "out.onnx", ConvertOptions(config=QuantConfig(algorithm="quip")))
    assert not (tmp_path / "out.onnx").exists()


def test_cli_unknown_algorithm(tmp_path, capsys):
    from tests.verify_support import assert_one_line_error, run_cli

    src = matmul_model(tmp_path / "m.onnx", random_weights(np.random.default_rng(0), 128, 32))
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--algorithm", "nope")
    assert_one_line_error(code, err, "unknown quantization algorithm 'nope'")
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--algorithm", "rtn", "--json")
    assert code == 0, err
    assert json.loads(out)["quantized"]


class _Recording(RoundToNearest):
    """Round-to-nearest that records what the writer hands it."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], SiteStats | None]] = []

    def quantize(self, weight, config, scale_dtype, stats=None):
        self.calls.append((weight.shape, stats))
        return super().quantize(weight, config, scale_dtype, stats)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq", "custom"])
def test_writers_use_the_configured_quantizer_and_its_statistics(tmp_path, monkeypatch, fmt):
    from ox_quant.core.config import Format

    probe = _Recording()
    monkeypatch.setitem(registry.QUANTIZERS, probe.name, probe)
    weights = random_weights(np.random.default_rng(1), 64, 32, 16)
    src = matmul_model(tmp_path / "m.onnx", weights)
    stats = SiteStats(np.linspace(0.1, 2.0, 64).astype(np.float32), count=10)
    bits = 4 if fmt != "custom" else 3
    config = QuantConfig(algorithm="recording", format=Format(fmt), bits=bits, granularity=Block(32))
    out = tmp_path / "probe.onnx"
    convert(src, out, ConvertOptions(config=config, calibration={"W0": stats}))
    assert sorted(probe.calls, key=lambda c: c[0]) == [((32, 16), None), ((64, 32), stats)]
    plain = tmp_path / "plain.onnx"
    convert(src, plain, ConvertOptions(config=QuantConfig(format=Format(fmt), bits=bits, granularity=Block(32))))
    assert out.read_bytes() == plain.read_bytes()  # the probe is round-to-nearest: same bytes
    if fmt == "custom" and not library_available():
        pytest.skip("the custom-op library is not built (ox-quant build-ops)")
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    y = run(out, {"x": x})[0]

    def dequantized(w: np.ndarray) -> np.ndarray:
        q = quantize(w, config)
        k, n = w.shape
        scales = expand_groups(q.scales.astype(np.float64), config.granularity, k, n)
        zps = expand_groups(q.zero_points.astype(np.float64), config.granularity, k, n)
        return (q.codes - zps) * scales

    expected = x.astype(np.float64) @ dequantized(weights["W0"]) @ dequantized(weights["W1"])
    assert relative_error(y, expected) < 1e-5  # the written model computes with the probe's codes


def test_site_stats_are_checked():
    with pytest.raises(OxQuantError, match="one value per input channel"):
        SiteStats(np.zeros((2, 2)), count=1)
    with pytest.raises(OxQuantError, match="at least one row"):
        SiteStats(np.zeros(4), count=0)
