"""The calibration stage: streaming statistics, feeds and their errors, levels, the one-pass and
sequential drivers, and ``convert --calibration`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ox_quant.algorithms.base import Needs, SiteStats, stats_bytes
from ox_quant.algorithms.mse import mse_quantize
from ox_quant.algorithms.rtn import RoundToNearest
from ox_quant.calibration import stats as stats_module
from ox_quant.calibration.driver import Target, calibrate
from ox_quant.calibration.feeds import FeedSource, calibration_feeds
from ox_quant.calibration.sites import site_levels
from ox_quant.calibration.stats import (
    Accumulator,
    diagonal_error,
    merge,
    output_error,
    quantized_error,
    stats_reference,
)
from ox_quant.core.config import Block, ChannelGroup, PerTensor, QuantConfig
from ox_quant.core.quantize import quantize
from ox_quant.errors import OxQuantError
from ox_quant.ir.examples import llm_shaped_model
from ox_quant.ir.modelio import load_model
from ox_quant.ir.sites import find_sites
from tests.helpers import matmul_model, random_weights, relative_error, run
from tests.verify_support import assert_one_line_error, run_cli

CONFIG = QuantConfig(bits=4, granularity=Block(32))


# ---------------------------------------------------------------- statistics
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 30).flatmap(lambda r: arrays(np.float32, (r, 5), elements=st.floats(-100, 100, width=32))),
       split=st.integers(1, 30), step=st.integers(1, 7))
def test_streaming_statistics_match_the_reference(rows, split, step):
    acc = Accumulator(5, hessian=True)
    saved, stats_module.ROWS_PER_STEP = stats_module.ROWS_PER_STEP, step
    try:
        for start in range(0, rows.shape[0], split):  # feeds of any size, rows folded `step` at a time
            acc.update(rows[start:start + split][None])
    finally:
        stats_module.ROWS_PER_STEP = saved
    got, ref = acc.result(), stats_reference(rows, hessian=True)
    assert got.count == ref.count == rows.shape[0]
    np.testing.assert_allclose(got.input_sq_mean, ref.input_sq_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.input_abs_mean, ref.input_abs_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.hessian, ref.hessian, rtol=1e-12, atol=1e-9)
    assert acc.nbytes == stats_bytes(5, True) == 16 * 5 + 8 * 25


def test_merge_and_output_error():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 6)), rng.standard_normal((5, 6))
    acc_a, acc_b = Accumulator(6, True), Accumulator(6, True)
    acc_a.update(a)
    acc_b.update(b)
    both = merge([acc_a, acc_b])
    ref = stats_reference(np.concatenate([a, b]), hessian=True)
    np.testing.assert_allclose(both.hessian, ref.hessian, rtol=1e-12)
    w = rng.standard_normal((6, 4))
    approx = w + 0.01 * rng.standard_normal((6, 4))
    x = np.concatenate([a, b])
    direct = (np.linalg.norm(x @ (approx - w), axis=1) ** 2).mean() / (np.linalg.norm(x @ w, axis=1) ** 2).mean()
    assert output_error(w, approx, both.hessian) == pytest.approx(direct, rel=1e-10)


def test_non_finite_activations_are_refused():
    acc = Accumulator(3)
    with pytest.raises(OxQuantError, match="NaN or Inf activations"):
        acc.update(np.array([[1.0, np.nan, 0.0]]))


# ---------------------------------------------------------------- levels
def test_levels_of_an_llm_shaped_model(tmp_path):
    llm_shaped_model(tmp_path / "m.onnx", layers=2, hidden=32, mlp=64, vocab=50, tied=True)
    model = load_model(tmp_path / "m.onnx")
    sites, _ = find_sites(model)
    levels = site_levels(model, sites)
    for i in range(2):
        base = 4 * i
        assert {levels[f"layer{i}.{p}.weight"] for p in "qkv"} == {base + 1}
        assert levels[f"layer{i}.o.weight"] == base + 2
        assert levels[f"layer{i}.gate.weight"] == levels[f"layer{i}.up.weight"] == base + 3
        assert levels[f"layer{i}.down.weight"] == base + 4
    assert levels["embed.weight"] == 9  # the tied head: last, its Gather read float before


# ---------------------------------------------------------------- drivers
class SequentialRtn(RoundToNearest):
    name = "seq-rtn"
    sequential = True
    needs = Needs.HESSIAN

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], SiteStats | None] = {}

    def quantize(self, weight, config, scale_dtype, stats=None):
        self.seen[weight.shape] = stats
        return super().quantize(weight, config, scale_dtype, stats)


def feeds_of(arrays_: list[np.ndarray]) -> FeedSource:
    return FeedSource("memory", len(arrays_), lambda: iter({"x": a} for a in arrays_))


def test_sequential_driver_feeds_each_level_from_the_partly_quantized_model(tmp_path):
    weights = random_weights(np.random.default_rng(1), 64, 48, 32)
    src = matmul_model(tmp_path / "m.onnx", weights)
    model = load_model(src)
    sites, _ = find_sites(model)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 3, 64)).astype(np.float32) for _ in range(3)]
    probe = SequentialRtn()
    result = calibrate(model, [Target(s, CONFIG, probe) for s in sites], feeds_of(xs))
    try:
        assert result.sequential and result.passes == 2 and result.levels == 2
        w0q = quantize(weights["W0"], CONFIG).dequantize(np.float32)
        h = np.concatenate([(x @ w0q).reshape(-1, 48) for x in xs]).astype(np.float64)
        s1 = probe.seen[(48, 32)]
        assert s1 is not None and s1.count == 18 and s1.samples == 3
        np.testing.assert_allclose(s1.hessian, h.T @ h / 18, rtol=1e-5, atol=1e-6)  # W0 quantized upstream
        h_float = np.concatenate([(x @ weights["W0"]).reshape(-1, 48) for x in xs]).astype(np.float64)
        assert not np.allclose(s1.hessian, h_float.T @ h_float / 18, rtol=1e-5, atol=1e-6)
        report = result.reports["W1"]
        assert report.level == 2 and report.error_kind == "output" and report.error == report.error_rtn
        assert result.peak_state_bytes == stats_bytes(64, True)
        assert "hessian" not in result.stats["W1"].__dict__ or result.stats["W1"].hessian is None  # dropped after use
    finally:
        result.close()
    assert not result.store.folder.exists()


def test_one_pass_statistics_are_the_float_model_inputs(tmp_path):
    weights = random_weights(np.random.default_rng(3), 64, 48, 32)
    src = matmul_model(tmp_path / "m.onnx", weights, external=True)
    model = load_model(src)
    sites, _ = find_sites(model)
    xs = [np.random.default_rng(i).standard_normal((1, 3, 64)).astype(np.float32) for i in range(4)]
    result = calibrate(model, [Target(s, CONFIG, RoundToNearest()) for s in sites], feeds_of(xs))
    try:
        h = np.concatenate([(x @ weights["W0"]).reshape(-1, 48) for x in xs]).astype(np.float64)
        np.testing.assert_allclose(result.stats["W1"].input_sq_mean, (h * h).mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(result.stats["W1"].input_abs_mean, np.abs(h).mean(axis=0), rtol=1e-5)
        assert result.passes == 1 and result.stats["W1"].hessian is None
        assert result.reports["W0"].error_kind == "diagonal"
    finally:
        result.close()


# ---------------------------------------------------------------- convert end to end
@pytest.fixture
def chain(tmp_path):
    weights = random_weights(np.random.default_rng(5), 64, 48, 32)
    return matmul_model(tmp_path / "m.onnx", weights), weights


def test_convert_with_npz_calibration_writes_the_calibrated_result(tmp_path, chain, capsys):
    src, weights = chain
    rng = np.random.default_rng(6)
    folder = tmp_path / "feeds"
    folder.mkdir()
    xs = [rng.standard_normal((2, 3, 64)).astype(np.float32) for _ in range(3)]
    for i, x in enumerate(xs):
        np.savez(folder / f"{i}.npz", x=x)
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "convert", str(src), "-o", str(out), "--algorithm", "mse", "--block-size", "32",
                                "--calibration", str(folder), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["calibration"]["samples"] == 3 and report["calibration"]["schedule"] == "one pass"
    entries = {q["name"]: q for q in report["quantized"]}
    for name in ("W0", "W1"):
        cal = entries[name]["calibration"]
        assert entries[name]["algorithm"] == "mse" and cal["samples"] == 3 and cal["rows"] == 18
        assert cal["error_kind"] == "diagonal" and cal["error"] <= cal["error_rtn"]
    h = np.concatenate([(x @ weights["W0"]).reshape(-1, 48) for x in xs]).astype(np.float64)
    x0 = np.concatenate([x.reshape(-1, 64) for x in xs]).astype(np.float64)
    f32 = np.dtype(np.float32)
    config = QuantConfig(bits=4, granularity=Block(32), symmetric=False, algorithm="mse")
    w0 = mse_quantize(weights["W0"], config, f32, SiteStats((x0 * x0).mean(axis=0), 18)).dequantize()
    w1 = mse_quantize(weights["W1"], config, f32, SiteStats((h * h).mean(axis=0), 18)).dequantize()
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    assert relative_error(run(out, {"x": x})[0], x.astype(np.float64) @ w0 @ w1) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feeds", "m.onnx", "out.onnx"]  # no scratch left


def test_text_calibration_with_a_tokenizer_file(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(40)} | {"[UNK]": 40},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(500)), encoding="utf-8")
    src = tmp_path / "lm.onnx"
    llm_shaped_model(src, layers=1, hidden=64, mlp=128, vocab=41)
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "convert", str(src), "-o", str(out), "--algorithm", "hqq", "--block-size", "32",
                                "--calibration", str(text), "--tokenizer", str(tmp_path / "tokenizer.json"),
                                "--calibration-samples", "3", "--calibration-seq-len", "50", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["calibration"]["samples"] == 3 and "3 windows of 50 tokens" in report["calibration"]["source"]
    cal = [q["calibration"] for q in report["quantized"]]
    assert cal and all(c["rows"] == 150 and c["error"] <= c["error_rtn"] for c in cal)
    ids = np.arange(20, dtype=np.int64)[None] % 41
    assert np.isfinite(run(out, {"input_ids": ids})[0]).all()
    # too few tokens, and ids beyond the embedding table: one line each
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(out), "--calibration", str(text),
                           "--tokenizer", str(tmp_path / "tokenizer.json"), "--calibration-seq-len", "501")
    assert_one_line_error(code, err, "fewer than one window of --calibration-seq-len 501")
    small = tmp_path / "small.onnx"
    llm_shaped_model(small, layers=1, hidden=64, mlp=128, vocab=10)
    code, _, err = run_cli(capsys, "convert", str(small), "-o", str(out), "--calibration", str(text),
                           "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert_one_line_error(code, err, "embedding table has 10 rows")


def bad_npz(tmp_path, **arrays_):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays_)
    return str(path)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: bad_npz(p, y=np.zeros((1, 3, 64), np.float32)), "array 'y' is no input of the model"),
    (lambda p: bad_npz(p, x=np.zeros((3, 64), np.float32)), "has rank 2, the model expects 3"),
    (lambda p: bad_npz(p, x=np.zeros((1, 3, 60), np.float32)), "has size 60 on axis 2, the model expects 64"),
    (lambda p: bad_npz(p, x=np.zeros((1, 3, 64), np.int64)), "is int64, the model expects float32"),
    (lambda p: bad_npz(p, x=np.full((1, 3, 64), np.nan, np.float32)), "contains NaN or Inf"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "has no .npz files"),
    (lambda p: str(p / "missing.npz"), "calibration data not found"),
    (lambda p: (p / "t.txt").write_text("hello") and str(p / "t.txt"), "give --tokenizer FILE|MODEL"),
    (lambda p: (p / "b.txt").write_bytes(b"\xff\xfe\x00") and str(p / "b.txt"), "neither .npz nor UTF-8"),
    (lambda p: (p / "n.npz").write_bytes(b"not a zip") and str(p / "n.npz"), "cannot read calibration file"),
])
def test_bad_calibration_data_is_one_line(tmp_path, chain, capsys, make, fragment):
    src, _ = chain
    before = src.read_bytes()
    path = make(tmp_path)
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "out.onnx"), "--block-size", "32",
                           "--calibration", path)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists() and src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ox-quant")]


def test_calibration_flag_errors(tmp_path, chain, capsys):
    src, _ = chain
    out = str(tmp_path / "out.onnx")
    code, _, err = run_cli(capsys, "convert", str(src), "-o", out, "--calibration-samples", "4")
    out = "--block-size=32", "-o", out
    assert_one_line_error(code, err, "need --calibration PATH")
    np.savez(tmp_path / "f.npz", x=np.zeros((1, 3, 64), np.float32))
    code, _, err = run_cli(capsys, "convert", str(src), *out, "--calibration", str(tmp_path / "f.npz"),
                           "--calibration-samples", "0")
    assert_one_line_error(code, err, "--calibration-samples must be at least 1")
    code, _, err = run_cli(capsys, "convert", str(src), *out, "--calibration", str(tmp_path / "f.npz"),
                           "--tokenizer", "no-such-model")
    assert_one_line_error(code, err, "is neither a file nor a registered model")
    code, _, err = run_cli(capsys, "convert", str(src), *out, "--calibration", str(tmp_path / "f.npz"),
                           "--tokenizer", "toy-mlp")
    assert_one_line_error(code, err, "registered model 'toy-mlp' has no tokenizer")


def test_feeds_are_checked_against_the_model(tmp_path, chain):
    src, _ = chain
    model = load_model(src)
    np.savez(tmp_path / "f.npz", x=np.zeros((5, 3, 64), np.float64))
    feeds = calibration_feeds(tmp_path / "f.npz", model)
    (feed,) = list(feeds)
    assert feed["x"].dtype == np.float32 and feed["x"].shape == (5, 3, 64)  # the symbolic batch is free; cast
    assert list(feeds)[0]["x"].shape == (5, 3, 64)  # re-iterable


@pytest.mark.parametrize("granularity", [Block(8), PerTensor(), ChannelGroup(3)])
def test_error_in_column_slices_equals_the_whole(monkeypatch, granularity):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 20)).astype(np.float32)
    x = rng.standard_normal((50, 24))
    stats = stats_reference(x, hessian=True)
    q = quantize(w, QuantConfig(bits=3, granularity=granularity))
    whole = output_error(w, q.dequantize(), stats.hessian), diagonal_error(w, q.dequantize(), stats.input_sq_mean)
    monkeypatch.setattr(stats_module, "COLUMNS_ELEMENTS", 30)
    assert quantized_error(w, q, stats) == (pytest.approx(whole[0], rel=1e-12), "output")
    plain = SiteStats(stats.input_sq_mean, stats.count)
    assert quantized_error(w, q, plain) == (pytest.approx(whole[1], rel=1e-12), "diagonal")


@pytest.mark.parametrize("sequential", [False, True])
def test_calibrated_rtn_writes_the_bytes_of_plain_rtn(tmp_path, monkeypatch, capsys, sequential):
    """rtn ignores statistics: calibrating (one pass, or level by level with embeddings quantized
    first and the tied head last) must not change a byte of the output."""
    from ox_quant.algorithms import registry

    probe = SequentialRtn()
    probe.name = "rtn"
    if sequential:
        monkeypatch.setitem(registry.QUANTIZERS, "rtn", probe)
    src = tmp_path / "lm.onnx"
    llm_shaped_model(src, layers=2, hidden=64, mlp=128, vocab=60, tied=True)
    ids = np.random.default_rng(1).integers(0, 60, (2, 16))
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    flags = ["--block-size", "32", "--embedding-bits", "8"]
    code, stdout, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "cal.onnx"), *flags,
                                "--calibration", str(tmp_path / "ids.npz"), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["calibration"]["schedule"] == ("sequential" if sequential else "one pass")
    levels = {q["name"]: q["calibration"]["level"] for q in report["quantized"]}
    assert levels["embed.weight"] == (9 if sequential else 1)  # the tied table: its MatMul use is observed
    if sequential:
        assert report["calibration"]["passes"] == 9 and len(probe.seen) >= 4
    monkeypatch.undo()
    assert run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "plain.onnx"), *flags)[0] == 0
    assert (tmp_path / "cal.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()


def test_recipe_rules_pick_algorithms_per_weight(tmp_path, chain, capsys):
    src, _ = chain
    recipe = tmp_path / "r.yaml"
    recipe.write_text('rules:\n  - match: "W1"\n    algorithm: hqq\n')
    np.savez(tmp_path / "f.npz", x=np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32))
    code, stdout, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o.onnx"), "--block-size", "32",
                                "--algorithm", "mse", "--recipe", str(recipe), "--calibration", str(tmp_path / "f.npz"),
                                "--json")
    assert code == 0, err
    got = {q["name"]: (q["algorithm"], q["calibration"]["algorithm"]) for q in json.loads(stdout)["quantized"]}
    assert got == {"W0": ("mse", "mse"), "W1": ("hqq", "hqq")}


def test_segments_give_the_statistics_of_running_the_whole_prefix(tmp_path):
    """The sequential schedule runs each level's new nodes only, reading earlier tensors from a
    cache; the statistics equal those of running the model from its inputs for every level."""
    src = tmp_path / "lm.onnx"
    llm_shaped_model(src, layers=2, hidden=48, mlp=96, vocab=70, tied=True, external=True)
    model = load_model(src)
    sites, _ = find_sites(model)
    rng = np.random.default_rng(4)
    ids = [rng.integers(0, 70, (1, 12)) for _ in range(3)]
    feeds = FeedSource("memory", 3, lambda: iter({"input_ids": a} for a in ids))
    config = QuantConfig(bits=3, granularity=Block(16))
    runs = []
    for segments in (True, False):
        probe = SequentialRtn()
        result = calibrate(model, [Target(s, config, probe) for s in sites], feeds, segments=segments)
        runs.append((result, probe))
        result.close()
    (fast, fast_probe), (slow, slow_probe) = runs
    assert fast.passes == slow.passes == 9 and fast.cache_peak_bytes > 0 and slow.cache_peak_bytes == 0
    for name, report in slow.reports.items():
        assert fast.reports[name].rows == report.rows
        assert fast.reports[name].error == pytest.approx(report.error, rel=1e-6)
        np.testing.assert_allclose(fast.stats[name].input_sq_mean, slow.stats[name].input_sq_mean, rtol=1e-5)
    for shape, stats in slow_probe.seen.items():
        np.testing.assert_allclose(fast_probe.seen[shape].hessian, stats.hessian, rtol=1e-5, atol=1e-7)
