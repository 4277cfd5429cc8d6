"""Metrics: equal to an independent numpy computation; known answers; properties."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ox_quant.core.jsonify import to_jsonable
from ox_quant.core.metrics import compare
from ox_quant.verification.verify import verify
from tests.verify_support import exported, quantize_qdq  # noqa: F401 (fixture)


def _ort_outputs(path, feeds):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_reported_metrics_equal_independent_numpy(exported, tmp_path):  # noqa: F811
    ref_path, _ = exported["toy-transformer"]
    cand = tmp_path / "int4.onnx"
    quantize_qdq(ref_path, cand, bits=4, per_channel=True)
    ids = np.random.default_rng(5).integers(0, 256, (3, 10)).astype(np.int64)
    report = verify(ref_path, cand, inputs={"input_ids": ids})
    r = _ort_outputs(ref_path, {"input_ids": ids}).astype(np.float64)
    c = _ort_outputs(cand, {"input_ids": ids}).astype(np.float64)
    m = report.outputs[0]
    assert m.shape == (3, 10, 256)
    assert math.isclose(m.max_abs_err, np.max(np.abs(r - c)), rel_tol=1e-12)
    assert math.isclose(m.mean_abs_err, np.mean(np.abs(r - c)), rel_tol=1e-9)
    assert math.isclose(m.rel_l2, np.linalg.norm(r - c) / np.linalg.norm(r), rel_tol=1e-9)
    assert math.isclose(m.sqnr_db, 10 * np.log10(np.sum(r**2) / np.sum((r - c) ** 2)), rel_tol=1e-9)
    assert math.isclose(m.cosine, np.sum(r * c) / np.sqrt(np.sum(r * r) * np.sum(c * c)), rel_tol=1e-12)
    rows_r, rows_c = r.reshape(-1, 256), c.reshape(-1, 256)
    assert m.argmax_agreement == np.mean(rows_r.argmax(1) == rows_c.argmax(1))
    overlap = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(rows_r, rows_c, strict=True)]
    assert math.isclose(m.top5_agreement, float(np.mean(overlap)), rel_tol=1e-12)
    assert 0 < m.sqnr_db < 60  # really quantized, really measured


def test_known_answers():
    ref = np.array([[3.0, 1.0, 0.0, -1.0, 2.0, 5.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    cand = ref.copy()
    cand[0, 5] = 0.0  # row 0: argmax moves from index 5 to 6
    m = compare("y", ref, cand)
    assert m.max_abs_err == 5.0 and math.isclose(m.mean_abs_err, 5.0 / 14)
    assert math.isclose(m.sqnr_db, 10 * math.log10(np.sum(ref**2) / 25.0))
    assert m.argmax_agreement == 0.5
    # row 0 top-5 of ref {5,6,0,4,1}; of cand {6,0,4,1,2}: 4 of 5 shared; row 1 identical
    assert math.isclose(m.top5_agreement, (4 / 5 + 1) / 2)
    same = compare("y", ref, ref)
    assert same.sqnr_db == math.inf and same.max_abs_err == 0 and same.cosine == 1.0
    assert json.loads(json.dumps(to_jsonable(same)))["sqnr_db"] is None  # inf -> null
    assert compare("i", np.arange(4), np.arange(4)).argmax_agreement is None  # not logits-like
    nan = compare("y", ref, np.full_like(ref, np.nan))
    assert nan.nonfinite == ref.size and math.isnan(nan.sqnr_db)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, (4, 8), elements=st.floats(-1e3, 1e3, allow_subnormal=False)),
    arrays(np.float64, (4, 8), elements=st.floats(-10, 10, allow_subnormal=False)),
)
def test_metric_identities(ref, noise):
    m = compare("y", ref, ref + noise)
    if 0.0 < m.rel_l2 < math.inf:  # some difference survived float64 rounding
        assert math.isclose(m.sqnr_db, -20 * math.log10(m.rel_l2), rel_tol=1e-9, abs_tol=1e-9)
    assert -1.0 - 1e-12 <= m.cosine <= 1.0 + 1e-12
    assert m.mean_abs_err <= m.max_abs_err + 1e-12
    assert 0.0 <= m.argmax_agreement <= 1.0 and 0.0 <= m.top5_agreement <= 1.0
