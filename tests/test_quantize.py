"""The vectorised quantizer against the slow reference, and the round-to-nearest bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ox_quant.core.config import Block, ChannelGroup, PerChannel, PerTensor, QuantConfig
from ox_quant.core.quantize import quantize, quantize_reference

granularities = st.one_of(
    st.just(PerTensor()),
    st.just(PerChannel()),
    st.integers(1, 40).map(Block),
    st.integers(1, 12).map(ChannelGroup),
)


@st.composite
def weights(draw):
    k = draw(st.integers(1, 48))
    n = draw(st.integers(1, 12))
    elements = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    w = draw(arrays(np.float32, (k, n), elements=elements))
    if draw(st.booleans()):  # an all-zero output channel
        w[:, draw(st.integers(0, n - 1))] = 0
    return w


@settings(max_examples=300, deadline=None)
@given(w=weights(), bits=st.integers(2, 8), symmetric=st.booleans(), granularity=granularities,
       fp16=st.booleans())
def test_fast_matches_reference(w, bits, symmetric, granularity, fp16):
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    scale_dtype = np.float16 if fp16 else np.float32
    fast = quantize(w, config, scale_dtype)
    ref = quantize_reference(w, config, scale_dtype)
    np.testing.assert_array_equal(fast.codes, ref.codes)
    np.testing.assert_array_equal(fast.scales, ref.scales)
    np.testing.assert_array_equal(fast.zero_points, ref.zero_points)
    assert fast.scales.dtype == scale_dtype
    assert fast.scales.shape == granularity.scale_shape(*w.shape)


@settings(max_examples=300, deadline=None)
@given(w=weights(), bits=st.integers(2, 8), symmetric=st.booleans(), granularity=granularities)
def test_round_to_nearest_error_bound(w, bits, symmetric, granularity):
    """|w - dequant(w)| <= scale/2 for every element, codes in range, no NaN/Inf."""
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    q = quantize(w, config)
    assert q.codes.max(initial=0) <= config.qmax
    deq = q.dequantize()
    assert np.isfinite(deq).all()
    bound = q.expand(q.scales.astype(np.float64)) / 2
    err = np.abs(deq - w.astype(np.float64))
    # float32 arithmetic in the quantizer: allow a few ulps of the group's range
    slack = 1e-5 * q.expand(q.scales.astype(np.float64)) * config.qmax + 1e-30
    assert (err <= bound + slack).all(), float((err - bound).max())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_all_zero_weight_dequantizes_to_zero(bits, symmetric):
    w = np.zeros((64, 8), dtype=np.float32)
    q = quantize(w, QuantConfig(bits=bits, granularity=Block(32), symmetric=symmetric))
    assert np.isfinite(q.scales).all()
    assert (q.dequantize() == 0).all()


def test_symmetric_is_symmetric_and_asymmetric_covers_range():
    w = np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(64, 1)
    sym = quantize(w, QuantConfig(bits=4, granularity=PerTensor(), symmetric=True))
    assert sym.zero_points.item() == 8
    assert sym.scales.item() == pytest.approx(3.0 / 7)
    asym = quantize(w, QuantConfig(bits=4, granularity=PerTensor(), symmetric=False))
    assert asym.scales.item() == pytest.approx(4.0 / 15)
    deq = asym.dequantize()
    assert deq.min() == pytest.approx(-1.0, abs=asym.scales.item() / 2)
    assert deq.max() == pytest.approx(3.0, abs=asym.scales.item() / 2)


def test_more_bits_and_finer_groups_lose_less():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((256, 64)) * np.exp(rng.standard_normal((1, 64)))).astype(np.float32)

    def err(config):
        return float(np.abs(quantize(w, config).dequantize() - w).mean())

    assert err(QuantConfig(bits=8, granularity=PerChannel())) < err(QuantConfig(bits=4, granularity=PerChannel()))
    assert err(QuantConfig(bits=4, granularity=Block(32))) < err(QuantConfig(bits=4, granularity=PerChannel()))
    assert err(QuantConfig(bits=4, granularity=PerChannel())) < err(QuantConfig(bits=4, granularity=ChannelGroup(16)))
    assert err(QuantConfig(bits=4, granularity=ChannelGroup(16))) < err(QuantConfig(bits=4, granularity=PerTensor()))
