"""PP-OCR's detector and orientation classifier, magika's file-type model: inputs, tasks, int8 Conv."""

from __future__ import annotations

import numpy as np

from tests.real_models import ox_quant, require

needs_ocr = require("rapidocr_onnxruntime", "rapidocr-onnxruntime")
needs_magika = require("magika", "magika")


def test_magika_features_match_a_slow_reference():
    """beg: first 4096 bytes, left-stripped, first 1024, right-padded with 256; end: mirror image."""
    from ox_quant_models.magika import BEG_SIZE, PADDING, features

    rng = np.random.default_rng(0)
    for size in (0, 5, 1500, 5000):
        content = b"  \n\t" + bytes(rng.integers(0, 256, size, dtype=np.uint8)) + b" \n"
        head = bytearray(content[:4096])
        while head and head[0] in b" \t\n\r\x0b\x0c":
            del head[0]
        tail = bytearray(content[-4096:])
        while tail and tail[-1] in b" \t\n\r\x0b\x0c":
            del tail[-1]
        head, tail = list(head[:BEG_SIZE]), list(tail[-BEG_SIZE:])
        expected = head + [PADDING] * (BEG_SIZE - len(head)) + [PADDING] * (BEG_SIZE - len(tail)) + tail
        assert features(content).tolist() == expected


@needs_magika
def test_magika_fp32_agrees_with_itself_and_int8_conv_runs(tmp_path):
    from ox_quant_models import magika
    from ox_quant_models.tasks.filetype import evaluate, sample_files

    assert len(sample_files()) == 64
    assert evaluate().metrics["agreement"] == 1.0
    out = tmp_path / "m.onnx"
    ox_quant("convert", str(magika.onnx_path()), "-o", str(out), "--bits", "8", "--conv-bits", "8")
    assert evaluate(out).metrics["agreement"] >= 0.95


@needs_ocr
def test_detector_finds_the_rendered_text_and_int8_conv_keeps_the_mask(tmp_path):
    from ox_quant_models import ppocr
    from ox_quant_models.tasks.ocr_aux import evaluate_detector

    fp32 = evaluate_detector()
    assert fp32.metrics["mask_iou"] == 1.0
    assert fp32.metrics["text_fraction"] >= 0.9 and fp32.metrics["mask_pixels"] > 10000
    src = ppocr.prepare(tmp_path / "det.onnx", ppocr.package_model(ppocr.DET_MODEL))
    ox_quant("convert", str(src), "-o", str(tmp_path / "q.onnx"), "--conv-bits", "8")
    assert evaluate_detector(tmp_path / "q.onnx").metrics["mask_iou"] >= 0.95


@needs_ocr
def test_classifier_reads_orientation_and_default_leaves_conv_float(tmp_path):
    from ox_quant_models import ppocr
    from ox_quant_models.tasks.ocr_aux import evaluate_classifier

    assert evaluate_classifier().metrics["accuracy"] >= 0.9
    src = ppocr.prepare(tmp_path / "cls.onnx", ppocr.package_model(ppocr.CLS_MODEL))
    proc = ox_quant("convert", str(src), "-o", str(tmp_path / "q.onnx"), "--json")
    import json

    report = json.loads(proc.stdout)
    assert {q["op"] for q in report["quantized"]} <= {"MatMul", "Gemm"}
    assert any("left float by the default policy" in s["reason"] for s in report["skipped"])
    result = evaluate_classifier(tmp_path / "q.onnx")
    assert result.metrics["agreement"] >= 0.95
