"""CREPE tiny: fp32 through PyTorch and ONNX Runtime agree; int8 per-channel keeps pitch accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_models import convert_int8_per_channel, require

pytestmark = [pytest.mark.models, require("torchcrepe", "torchcrepe")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ox_quant.export.exporter import export_model
    from ox_quant_models import crepe

    model, inputs = crepe.factory()
    path = tmp_path_factory.mktemp("crepe") / "crepe-tiny.onnx"
    export_model(model, inputs, path, output_names=crepe.OUTPUT_NAMES, dynamo=True)
    return model, path


def test_fp32_torch_reads_synthetic_tones():
    from ox_quant_models.tasks.pitch import evaluate

    result = evaluate()
    assert result.backend == "torch"
    assert result.metrics["raw_pitch_accuracy"] >= 0.95
    assert result.metrics["cents_error_mean"] < 10.0


def test_onnx_matches_torch(exported):
    from ox_quant.evaluation.tasks import OrtRunner
    from ox_quant_models import crepe
    from ox_quant_models.tasks.pitch import evaluate, tones

    model, path = exported
    frames, _ = tones()
    import torch

    with torch.inference_mode():
        ref = model(torch.from_numpy(frames)).numpy()
    got = OrtRunner(path)({"frames": frames})[0]
    assert got.shape == (len(frames), crepe.PITCH_BINS)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    a, b = evaluate(model), evaluate(path)
    assert b.backend == "onnxruntime"
    assert a.metrics["raw_pitch_accuracy"] == b.metrics["raw_pitch_accuracy"]
    assert abs(a.metrics["cents_error_mean"] - b.metrics["cents_error_mean"]) < 0.01


def test_int8_per_channel_keeps_pitch(exported, tmp_path):
    from ox_quant_models.tasks.pitch import evaluate

    model, path = exported
    quantized = tmp_path / "crepe-tiny.int8.onnx"
    report = convert_int8_per_channel(path, quantized)
    fp32 = evaluate(model)
    q = evaluate(quantized)
    assert any(w["op"] in ("Conv", "MatMul", "Gemm") for w in report["quantized"])
    assert q.metrics["raw_pitch_accuracy"] >= fp32.metrics["raw_pitch_accuracy"] - 0.05
    assert q.metrics["cents_error_mean"] < fp32.metrics["cents_error_mean"] + 5.0
