"""GPTQ: the blocked Cholesky form held to the textbook loop, its layout, its error against
round-to-nearest on the same calibration data, and models written with it run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ox_quant.algorithms.base import SiteStats
from ox_quant.algorithms.gptq import GPTQ, gptq_quantize, gptq_reference, lower_inverse, upper_inverse_cholesky
from ox_quant.algorithms.registry import get_quantizer
from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig, SymmetricRule
from ox_quant.core.quantize import quantize
from ox_quant.errors import OxQuantError
from ox_quant.pipeline.convert import ConvertOptions, convert
from tests.helpers import matmul_model, relative_error, run

GRANULARITIES = [PerTensor(), PerChannel(), Block(4), Block(5), Block(16), ChannelGroup(3)]


def calibration_rows(rng: np.random.Generator, m: int, k: int, outliers: int = 0, dead: int = 0) -> np.ndarray:
    """``X[m, k]``: ``outliers`` sources 20x larger, mixed into every channel (correlated
    activations, as a layer's inputs are), then ``dead`` channels set to zero."""
    scale = np.ones(k)
    picks = rng.permutation(k)
    scale[picks[:outliers]] = 20.0
    x = (rng.standard_normal((m, k)) * scale) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, picks[outliers : outliers + dead]] = 0.0
    return x


def stats_of(x: np.ndarray) -> SiteStats:
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return SiteStats(np.mean(x2**2, axis=0), x2.shape[0], np.mean(np.abs(x2), axis=0), x2.T @ x2 / x2.shape[0])


def output_error(x: np.ndarray, w: np.ndarray, q) -> float:
    return float(np.sum((x @ (q.dequantize() - w.astype(np.float64))) ** 2))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 9), st.integers(2, 8), st.booleans(), st.sampled_from(GRANULARITIES),
    st.booleans(), st.integers(1, 17), st.integers(0, 3), st.sampled_from([np.float32, np.float16]),
    st.sampled_from(list(SymmetricRule)), st.integers(0, 2**31 - 1),
)
def test_fast_matches_the_reference(k, n, bits, symmetric, granularity, act_order, block, dead, scale_dtype, rule,
                                    seed):
    """Same codes, scales and zero points as the textbook loop, for every granularity,
    bit width, symmetric rule, act-order, block size, dead channels and scale dtype."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = calibration_rows(rng, 3 * k + 5, k, outliers=min(2, k), dead=min(dead, k))
    h = x.T @ x / x.shape[0]
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric, symmetric_rule=rule)
    ref = gptq_reference(w, h, config, scale_dtype, act_order=act_order)
    fast = gptq_quantize(w, h, config, scale_dtype, act_order=act_order, block=block)
    np.testing.assert_array_equal(fast.codes, ref.codes)
    np.testing.assert_array_equal(fast.scales, ref.scales)
    np.testing.assert_array_equal(fast.zero_points, ref.zero_points)
    rtn = quantize(w, config, scale_dtype=scale_dtype)  # the layout round-to-nearest gives
    assert fast.scales.shape == rtn.scales.shape and fast.scales.dtype == rtn.scales.dtype
    assert fast.codes.dtype == np.uint8 and fast.codes.max(initial=0) <= config.qmax
    assert (fast.zero_points == config.mid).all() if symmetric else True


def test_triangular_inverse_and_factor():
    rng = np.random.default_rng(0)
    for k in (1, 7, 300, 600):
        x = rng.standard_normal((2 * k + 3, k))
        h = x.T @ x
        lower = np.linalg.cholesky(h)
        np.testing.assert_allclose(lower_inverse(lower) @ lower, np.eye(k), atol=1e-9)
        u = upper_inverse_cholesky(h)
        assert np.allclose(np.tril(u, -1), 0) and (np.diag(u) > 0).all()
        np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-12)


def test_without_calibration_rows_gptq_is_round_to_nearest():
    """H = I (uncorrelated unit inputs): no error is worth moving, GPTQ rounds to nearest."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    for granularity in (Block(16), PerChannel()):
        config = QuantConfig(bits=4, granularity=granularity, symmetric=False)
        got = gptq_quantize(w, np.eye(64), config, damp=0.0)
        np.testing.assert_array_equal(got.codes, quantize(w, config).codes)


@pytest.mark.parametrize("granularity", [Block(32), Block(128), PerChannel()], ids=str)
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True), (2, False)])
def test_gptq_reduces_the_calibration_output_error(granularity, bits, symmetric):
    """||X W - X W_q||^2 on the calibration rows (outlier channels): well below RTN's, act-order lower still."""
    rng = np.random.default_rng(bits * 10 + symmetric)
    k, n = 256, 48
    x = calibration_rows(rng, 1024, k, outliers=8, dead=2)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    config = QuantConfig(bits=bits, granularity=granularity, symmetric=symmetric)
    rtn = output_error(x, w, quantize(w, config))
    plain = output_error(x, w, gptq_quantize(w, x.T @ x / len(x), config))
    ordered = output_error(x, w, gptq_quantize(w, x.T @ x / len(x), config, act_order=True))
    assert plain < 0.5 * rtn
    assert ordered < plain


def test_registered_and_without_statistics_rounds_to_nearest(tmp_path):
    """A weight with no statistics (embedding, Conv, unobservable input) is rounded to nearest;
    convert refuses GPTQ with no calibration at all (tests below)."""
    assert isinstance(get_quantizer("gptq"), GPTQ) and get_quantizer("gptq").act_order
    assert not get_quantizer("gptq-noact").act_order  # type: ignore[attr-defined]
    w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    config = QuantConfig(granularity=PerChannel())
    for stats in (None, SiteStats(np.ones(16), 3)):
        got = get_quantizer("gptq").quantize(w, config, np.dtype(np.float32), stats)
        np.testing.assert_array_equal(got.codes, quantize(w, config).codes)
    with pytest.raises(OxQuantError, match=r"Hessian is \[3, 3\] but the weight has K=4"):
        gptq_quantize(np.ones((4, 2)), np.eye(3), QuantConfig(granularity=PerChannel()))


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_model_written_with_gptq_runs_in_onnx_runtime(tmp_path, fmt):
    """Both weights quantized by GPTQ on their own inputs; ORT's output is the float64
    product with the dequantized GPTQ weights, and closer to float than RTN's model."""
    rng = np.random.default_rng(3)
    k, mid_dim, n = 64, 48, 32
    weights = {"W0": (rng.standard_normal((k, mid_dim)) / 8).astype(np.float32),
               "W1": (rng.standard_normal((mid_dim, n)) / 7).astype(np.float32)}
    src = matmul_model(tmp_path / "m.onnx", weights)
    x = calibration_rows(rng, 2 * 3 * 40, k, outliers=3).astype(np.float32).reshape(-1, 3, k)
    x0 = x.reshape(-1, k).astype(np.float64)
    x1 = x0 @ weights["W0"].astype(np.float64)
    stats = {"W0": stats_of(x0), "W1": stats_of(x1)}
    config = QuantConfig(bits=4, granularity=Block(16), algorithm="gptq", format=Format(fmt))
    out = tmp_path / "gptq.onnx"
    convert(src, out, ConvertOptions(config=config, calibration=stats))
    got = run(out, {"x": x})[0]
    q0 = gptq_quantize(weights["W0"], stats["W0"].hessian, config, act_order=True).dequantize()
    q1 = gptq_quantize(weights["W1"], stats["W1"].hessian, config, act_order=True).dequantize()
    expected = x.astype(np.float64) @ q0 @ q1
    assert relative_error(got, expected) < 1e-5
    rtn_out = tmp_path / "rtn.onnx"
    convert(src, rtn_out, ConvertOptions(config=QuantConfig(bits=4, granularity=Block(16), format=Format(fmt))))
    reference = x.astype(np.float64) @ weights["W0"] @ weights["W1"]
    assert np.sum((got - reference) ** 2) < np.sum((run(rtn_out, {"x": x})[0] - reference) ** 2)


def _feeds(folder, rng, count, shape, outlier_every=13):
    folder.mkdir()
    k = shape[-1]
    boost = np.where(np.arange(k) % outlier_every == 0, 10.0, 1.0)
    for i in range(count):
        np.savez(folder / f"f{i}.npz", x=(rng.standard_normal(shape) * boost).astype(np.float32))
    return folder


def test_cli_end_to_end_on_the_example_model(tmp_path, capsys):
    """``convert --algorithm gptq --calibration DIR``: sequential calibration, every weight's
    calibration error below RTN's, and ORT's output on a held-out feed closer to float than RTN's."""
    import json

    from ox_quant.ir.examples import llm_shaped_model
    from tests.helpers import run_cli

    rng = np.random.default_rng(7)
    src = tmp_path / "toy.onnx"
    llm_shaped_model(src, layers=1, hidden=64, mlp=96)
    feeds = _feeds(tmp_path / "feeds", rng, 6, (1, 12, 64))
    outs = {}
    for algorithm in ("rtn", "gptq"):
        outs[algorithm] = tmp_path / f"{algorithm}.onnx"
        code, out, err = run_cli(capsys, "convert", str(src), "-o", str(outs[algorithm]), "--algorithm", algorithm,
                                 "--calibration", str(feeds), "--granularity", "block:32", "--json")
        assert code == 0, err
        report = json.loads(out)
    assert report["calibration"]["schedule"] == "sequential"
    for entry in report["quantized"]:
        assert entry["calibration"]["error"] < entry["calibration"]["error_rtn"]
    held = (rng.standard_normal((2, 12, 64)) * np.where(np.arange(64) % 13 == 0, 10.0, 1.0)).astype(np.float32)
    ref = run(src, {"x": held})[0].astype(np.float64)
    err = {a: float(np.sum((run(p, {"x": held})[0] - ref) ** 2)) for a, p in outs.items()}
    assert err["gptq"] < err["rtn"]


def test_cli_gptq_without_calibration_is_one_line(tmp_path, capsys):
    from tests.helpers import random_weights, run_cli
    from tests.verify_support import assert_one_line_error

    src = matmul_model(tmp_path / "m.onnx", random_weights(np.random.default_rng(0), 128, 128, 32))
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--algorithm", "gptq")
    assert_one_line_error(code, err, "--algorithm gptq needs calibration data (--calibration)")
    assert not (tmp_path / "o.onnx").exists()
    recipe = tmp_path / "r.yaml"  # one layer by recipe: refused alike
    recipe.write_text("rules:\n  - match: W1\n    algorithm: gptq\n")
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe))
    assert_one_line_error(code, err, "--algorithm gptq needs calibration data (--calibration)")
