"""``mse`` and ``hqq``: the fast searches held to their one-group references, never worse than
round-to-nearest, and models written with them run in ONNX Runtime as their float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ox_quant.algorithms import search
from ox_quant.algorithms.base import SiteStats
from ox_quant.algorithms.hqq import hqq_quantize, hqq_reference
from ox_quant.algorithms.mse import mse_quantize, mse_reference
from ox_quant.algorithms.registry import get_quantizer
from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig, SymmetricRule
from ox_quant.core.quantize import quantize
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.runtime.custom_ops import library_available
from tests.helpers import matmul_model, random_weights, relative_error, run

granularities = st.one_of(
    st.just(PerTensor()), st.just(PerChannel()), st.integers(1, 24).map(Block), st.integers(1, 8).map(ChannelGroup),
)


@st.composite
def weights(draw):
    k = draw(st.integers(1, 24))
    n = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e2]))
    w = draw(arrays(np.float32, (k, n), elements=st.floats(-1, 1, width=32))) * np.float32(scale)
    if draw(st.booleans()):
        w[:, draw(st.integers(0, n - 1))] = 0
    return w


@st.composite
def cases(draw):
    w = draw(weights())
    config = QuantConfig(bits=draw(st.integers(2, 8)), granularity=draw(granularities), symmetric=draw(st.booleans()),
                         symmetric_rule=draw(st.sampled_from(list(SymmetricRule))))
    scale_dtype = np.dtype(draw(st.sampled_from([np.float32, np.float16])))
    stats = None
    if draw(st.booleans()):
        imp = draw(arrays(np.float64, (w.shape[0],), elements=st.floats(0, 10)))
        stats = SiteStats(imp, 7)
    return w, config, scale_dtype, stats


def same(a, b) -> None:
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zero_points, b.zero_points)
    assert a.scales.dtype == b.scales.dtype


def weighted_error(w: np.ndarray, q, importance: np.ndarray | None) -> float:
    imp = np.ones(w.shape[0]) if importance is None else importance
    return float(imp @ ((q.dequantize(np.float64) - w.astype(np.float64)) ** 2).sum(axis=1))


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_mse_fast_matches_reference(case):
    w, config, scale_dtype, stats = case
    same(mse_quantize(w, config, scale_dtype, stats), mse_reference(w, config, scale_dtype, stats))


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_hqq_fast_matches_reference(case):
    w, config, scale_dtype, _ = case
    same(hqq_quantize(w, config, scale_dtype), hqq_reference(w, config, scale_dtype))


@pytest.mark.parametrize("granularity", [Block(8), PerChannel(), ChannelGroup(3), PerTensor()])
def test_column_chunks_change_nothing(monkeypatch, granularity):
    """Large weights are searched in slices of whole column groups: the same result as at once."""
    w = random_weights(np.random.default_rng(8), 40, 30)["W0"]
    stats = SiteStats(np.random.default_rng(9).random(40), 3)
    f32 = np.dtype(np.float32)
    for symmetric in (False, True):
        config = QuantConfig(bits=3, granularity=granularity, symmetric=symmetric)
        whole = mse_quantize(w, config, f32, stats), hqq_quantize(w, config, f32)
        monkeypatch.setattr(search, "CHUNK_ELEMENTS", 50)
        same(mse_quantize(w, config, f32, stats), whole[0])
        same(hqq_quantize(w, config, f32), whole[1])
        same(whole[0], mse_reference(w, config, f32, stats))
        monkeypatch.undo()


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_never_worse_than_round_to_nearest(case):
    """mse: on the importance-weighted error when statistics are given; hqq: on the plain one."""
    w, config, scale_dtype, stats = case
    rtn = quantize(w, config, scale_dtype)
    imp = None if stats is None else stats.input_sq_mean
    tol = 1e-9  # the comparison is per group in float64; summed over groups here
    assert weighted_error(w, mse_quantize(w, config, scale_dtype, stats), imp) <= weighted_error(w, rtn, imp) * (1 + tol)
    assert weighted_error(w, hqq_quantize(w, config, scale_dtype), None) <= weighted_error(w, rtn, None) * (1 + tol)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_searches_lower_the_error_on_gaussian_weights(bits, symmetric):
    """Not only never worse: on 256 x 64 Gaussian weights with outliers both find lower error."""
    w = random_weights(np.random.default_rng(bits), 256, 64)["W0"]
    config = QuantConfig(bits=bits, granularity=Block(32), symmetric=symmetric)
    f32 = np.dtype(np.float32)
    rtn = weighted_error(w, quantize(w, config), None)
    assert weighted_error(w, mse_quantize(w, config, f32), None) < 0.97 * rtn
    assert weighted_error(w, hqq_quantize(w, config, f32), None) < rtn
    imp = np.random.default_rng(9).gamma(0.5, 2.0, 256)
    weighted = weighted_error(w, mse_quantize(w, config, f32, SiteStats(imp, 10)), imp)
    assert weighted < weighted_error(w, mse_quantize(w, config, f32), imp)  # the importance is used


def dequantized(w: np.ndarray, config: QuantConfig, stats: SiteStats | None) -> np.ndarray:
    return get_quantizer(config.algorithm).quantize(w, config, np.dtype(np.float32), stats).dequantize(np.float64)


@pytest.mark.parametrize("algorithm", ["mse", "hqq"])
@pytest.mark.parametrize("fmt, bits, granularity, symmetric", [
    ("matmulnbits", 4, Block(32), False),
    ("matmulnbits", 2, Block(16), True),
    ("qdq", 8, PerChannel(), True),
    ("qdq", 4, PerTensor(), False),
    ("custom", 3, Block(32), False),
    ("custom", 5, ChannelGroup(4), True),
])
def test_written_model_runs_as_its_float64_reference(tmp_path, algorithm, fmt, bits, granularity, symmetric):
    if fmt == "custom" and not library_available():
        pytest.skip("the custom-op library is not built (ox-quant build-ops)")
    weights = random_weights(np.random.default_rng(3), 64, 32, 16)
    src = matmul_model(tmp_path / "m.onnx", weights)
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric, format=Format(fmt), algorithm=algorithm)
    stats = {"W0": SiteStats(np.linspace(0.1, 3.0, 64), 5)} if algorithm == "mse" else None
    report = convert(src, tmp_path / "out.onnx", ConvertOptions(config=config, calibration=stats))
    assert [q.format for q in report.quantized] == [fmt, fmt] and {q.algorithm for q in report.quantized} == {algorithm}
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    y = run(tmp_path / "out.onnx", {"x": x})[0]
    s0 = stats["W0"] if stats else None
    expected = x.astype(np.float64) @ dequantized(weights["W0"], config, s0) @ dequantized(weights["W1"], config, None)
    assert relative_error(y, expected) < 1e-5
