"""PP-OCRv4 recogniser: reads rendered lines; hoisting Constant weights changes nothing; int8 still reads."""

from __future__ import annotations

import pytest

from tests.real_models import convert_int8_per_channel, require

pytestmark = pytest.mark.models

needs_package = require("rapidocr_onnxruntime", "rapidocr-onnxruntime")


@pytest.fixture(scope="module")
def hoisted(tmp_path_factory):
    from ox_quant_models import ppocr

    return ppocr.prepare(tmp_path_factory.mktemp("ppocr") / "ppocr-rec.onnx")


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    import numpy as np

    from ox_quant_models.tasks.ocr import ctc_greedy

    charset = ["<blank>", "a", "b"]
    path = [1, 1, 0, 1, 2, 2, 0, 0, 2]
    probs = np.eye(3)[path]
    assert ctc_greedy(probs, charset) == "aabb"


def test_edit_distance():
    from ox_quant_models.tasks.ocr import edit_distance

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("same", "same") == 0


@needs_package
def test_fp32_reads_rendered_lines():
    from ox_quant_models.tasks.ocr import evaluate

    result = evaluate()
    assert result.metrics["cer"] < 0.03
    assert result.metrics["line_accuracy"] >= 0.75


@needs_package
def test_hoisted_constants_give_same_predictions(hoisted):
    import onnx

    from ox_quant_models.tasks.ocr import evaluate

    proto = onnx.load(str(hoisted), load_external_data=False)
    assert not any(n.op_type == "Constant" for n in proto.graph.node)
    assert len(proto.graph.initializer) > 100
    assert evaluate(hoisted).details["predictions"] == evaluate().details["predictions"]


@needs_package
def test_int8_per_channel_still_reads(hoisted, tmp_path):
    from ox_quant_models.tasks.ocr import evaluate

    quantized = tmp_path / "ppocr-rec.int8.onnx"
    report = convert_int8_per_channel(hoisted, quantized)
    assert any(w["op"] == "MatMul" for w in report["quantized"])
    fp32 = evaluate(hoisted)
    result = evaluate(quantized)
    assert result.metrics["cer"] <= fp32.metrics["cer"] + 0.03


def test_torch_module_is_refused():
    from ox_quant.errors import OxQuantError
    from ox_quant_models.tasks.ocr import evaluate

    with pytest.raises(OxQuantError, match="ONNX files only"):
        evaluate(object())
