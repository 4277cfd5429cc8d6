"""Algorithm rows of the study: ox-quant's algorithms and MatMulNBitsQuantizer's methods,
each converted in a spawned child (wall time, peak RSS), the written models run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ox_quant.core.config import QuantConfig, parse_granularity
from ox_quant.errors import OxQuantError
from ox_quant.study.algorithms import ours_row, peer_method_row, peer_support
from ox_quant.study.child import ChildError, measured
from ox_quant.study.metrics import StudyMetric
from ox_quant.study.rows import StudyOptions, parse_only
from tests.helpers import matmul_model, random_weights, run

METRIC = StudyMetric("toy", "error", higher_is_better=False, relative=False, lossless=0.01, noticeable=0.03,
                     why="relative max output error vs the float model on fixed inputs")


class OutputError:
    """A scorer (``study.measure.Scorer``'s interface): relative output error of a model vs ``reference``."""

    metric = METRIC

    def __init__(self, reference: Path, x: np.ndarray) -> None:
        self.x = x
        self.expected = run(reference, {"x": x})[0]

    def __call__(self, path: Path) -> tuple[dict[str, float], list[str], dict[str, Any], float]:
        got = run(path, {"x": self.x})[0]
        err = float(np.abs(got - self.expected).max() / np.abs(self.expected).max())
        return {"error": err}, [], {}, 0.0


@pytest.fixture
def toy(tmp_path):
    rng = np.random.default_rng(0)
    src = matmul_model(tmp_path / "toy.onnx", random_weights(rng, 256, 128, 64))
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 3, 256)).astype(np.float32)} for _ in range(4)]
    return src, OutputError(src, x), feeds


def test_child_measures_and_reports_errors():
    value, seconds, (peak, start) = measured("math:factorial", 10)
    assert value == 3628800 and seconds > 0 and peak >= start > 0
    with pytest.raises(ChildError, match="math domain error") as info:
        measured("math:sqrt", -1.0)
    assert info.value.type_name == "ValueError"


def test_peer_support_reasons():
    assert peer_support("default", QuantConfig(bits=4, granularity=parse_granularity("block:32"))) is None
    why = peer_support("hqq", QuantConfig(bits=3, granularity=parse_granularity("block:128")))
    assert why is not None and "not 3" in why
    why = peer_support("rtn", QuantConfig(bits=4, granularity=parse_granularity("channel")))
    assert why is not None and "blocks along K" in why


def test_parse_only_filters_configurations():
    only = parse_only("4:block:128, 2:block:32")
    assert only == ((4, "block:128"), (2, "block:32"))
    opts = StudyOptions(model="x", bits=(4, 2), granularities=(parse_granularity("block:128"),
                                                               parse_granularity("block:32")), only=only)
    assert [(c.bits, str(c.granularity)) for c in opts.configs()] == [(4, "block:128"), (2, "block:32")]
    with pytest.raises(OxQuantError, match="BITS:GRANULARITY"):
        parse_only("block:128")


@pytest.mark.slow
def test_rows_of_both_tools_are_measured(toy, tmp_path):
    src, scorer, feeds = toy
    config = QuantConfig(bits=4, granularity=parse_granularity("block:32"), symmetric=True)
    options = StudyOptions(model="toy")
    rows = [ours_row(config, a, src, tmp_path, options, scorer, 0.0, feeds, "toy feeds") for a in ("rtn", "gptq")]
    rows += [peer_method_row(config, m, src, tmp_path, False, scorer, 0.0, feeds, "toy feeds")
             for m in ("default", "gptq")]
    for r in rows:
        assert r.status == "ok", (r.tool, r.algorithm, r.reason)
        assert r.weights_quantized == 2 and r.bits_per_weight is not None and 4.0 < r.bits_per_weight < 5.5
        assert r.peak_rss_bytes is not None and r.start_rss_bytes is not None
        assert r.peak_rss_bytes >= r.start_rss_bytes > 0 and r.convert_seconds is not None
        assert r.value is not None and 0.0 < r.value < 0.3  # 4-bit error: present, and bounded
    assert "calibration: toy feeds" in rows[1].reason and rows[0].reason == ""
    assert not list(tmp_path.glob("toy.*.onnx"))  # converted models removed


@pytest.mark.slow
def test_rows_with_reasons(toy, tmp_path):
    src, scorer, feeds = toy
    config = QuantConfig(bits=3, granularity=parse_granularity("block:32"), symmetric=True)
    row = peer_method_row(config, "default", src, tmp_path, False, scorer, 0.0, feeds, "toy feeds")
    assert row.status == "not supported" and "not 3" in row.reason
    config4 = QuantConfig(bits=4, granularity=parse_granularity("block:32"), symmetric=True)
    awq = peer_method_row(config4, "nvidia_awq", src, tmp_path, False, scorer, 0.0, feeds, "toy feeds")
    assert awq.status == "refused" and "nvidia_awq raised" in awq.reason
