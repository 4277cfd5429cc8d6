"""PP-OCR's text detector and orientation classifier, scored against their own fp32 outputs.

Neither has labelled data here, so both are scored by agreement with the package's fp32
model on inputs rendered with ``ox_quant_models.tasks.ocr``'s renderer (Pillow's built-in font):

- detector (DB, ``x [B, 3, H, W]`` -> probability map ``[B, 1, H, W]``): ``PAGES`` pages of
  four lines each, black on white, padded to multiples of 32, scaled ``(x/255 - 0.5)/0.5``
  (RapidOCR's settings). ``mask_iou = |A & B| / |A | B|`` of the text masks ``p > 0.3``
  (RapidOCR's threshold) of candidate and fp32, summed over all pages; ``text_fraction``:
  the share of fp32 mask pixels that fall inside the rendered lines' boxes (a check that the
  fp32 model finds the text at all).
- classifier (``x [B, 3, 48, 192]`` -> ``[B, 2]``, classes 0 and 180 degrees): every line,
  its left and right halves, each upright and rotated by 180 degrees (48 crops), resized to
  height 48 (width at most 192), scaled ``(x/255 - 0.5)/0.5``, zero-padded to 192.
  ``accuracy``: against the true orientation; ``agreement``: with the fp32 model's class.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.evaluation.tasks import OrtRunner, Progress, TaskResult, is_onnx_path, no_progress, target_label
from ox_quant_models import ppocr
from ox_quant_models.tasks.ocr import LINES, MARGIN, render

LINES_PER_PAGE = 4
THRESHOLD = 0.3
CLS_HEIGHT, CLS_WIDTH = 48, 192


def _scale(image: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3] -> float32 [3, H, W]``, ``(x/255 - 0.5)/0.5``."""
    return ((image.astype(np.float32).transpose(2, 0, 1) / 255.0) - 0.5) / 0.5


def pages() -> tuple[np.ndarray, np.ndarray]:
    """``(x [P, 3, H, W] float32, boxes [P, H, W] bool)``: pages of rendered lines and where the text is."""
    lines = [render(line) for line in LINES]
    groups = [lines[i:i + LINES_PER_PAGE] for i in range(0, len(lines), LINES_PER_PAGE)]
    width = 32 * math.ceil((max(im.shape[1] for im in lines) + 2 * MARGIN) / 32)
    height = 32 * math.ceil((max(sum(im.shape[0] for im in g) for g in groups) + 2 * MARGIN) / 32)
    out = np.full((len(groups), height, width, 3), 255, dtype=np.uint8)
    boxes = np.zeros((len(groups), height, width), dtype=bool)
    for p, group in enumerate(groups):
        top = MARGIN
        for im in group:
            out[p, top:top + im.shape[0], MARGIN:MARGIN + im.shape[1]] = im
            boxes[p, top:top + im.shape[0], MARGIN:MARGIN + im.shape[1]] = True
            top += im.shape[0]
    return np.stack([_scale(page) for page in out]), boxes


def crops() -> tuple[np.ndarray, np.ndarray]:
    """``(x [48, 3, 48, 192] float32, truth [48] int)``: crops upright (0) and rotated (1)."""
    from PIL import Image

    images, truth = [], []
    for line in LINES:
        full = render(line)
        half = full.shape[1] // 2
        for crop in (full, full[:, :half], full[:, half:]):
            for label, im in ((0, crop), (1, crop[::-1, ::-1])):
                h, w = im.shape[:2]
                width = min(CLS_WIDTH, math.ceil(CLS_HEIGHT * w / h))
                resized = np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((width, CLS_HEIGHT), Image.Resampling.BILINEAR))
                x = np.zeros((3, CLS_HEIGHT, CLS_WIDTH), dtype=np.float32)
                x[:, :, :width] = _scale(resized)
                images.append(x)
                truth.append(label)
    return np.stack(images), np.asarray(truth)


def _runner(target: Any, relative: str, task: str, provider: str, exact: bool) -> tuple[OrtRunner, OrtRunner]:
    if target is not None and not is_onnx_path(target):
        raise OxQuantError(f"the {task} task scores ONNX files only (the model has no PyTorch form)")
    reference = ppocr.package_model(relative)
    path = reference if target is None else Path(target)
    if not path.is_file():
        raise OxQuantError(f"model file {path} does not exist")
    return OrtRunner(reference, provider=provider, exact=exact), OrtRunner(path, provider=provider, exact=exact)


def evaluate_detector(target: Any = None, *, provider: str = "cpu", exact: bool = True,
                      progress: Progress = no_progress) -> TaskResult:
    """Text-mask IoU of ``target`` (an ONNX path; None = the package's fp32 detector) against fp32."""
    start = time.perf_counter()
    reference, candidate = _runner(target, ppocr.DET_MODEL, "ppocr-det", provider, exact)
    x, boxes = pages()
    progress(0, 2, "fp32")
    ref = reference({reference.input_names[0]: x})[0][:, 0] > THRESHOLD
    progress(1, 2, "candidate")
    cand = candidate({candidate.input_names[0]: x})[0][:, 0] > THRESHOLD
    progress(2, 2, "done")
    union = int((ref | cand).sum())
    iou = float((ref & cand).sum() / union) if union else 1.0
    return TaskResult(
        task="ppocr-det", model=target_label(target, "ppocr-det (package ONNX, fp32)"), backend=candidate.backend,
        primary="mask_iou",
        metrics={"mask_iou": iou, "text_fraction": float((ref & boxes).sum() / max(int(ref.sum()), 1)),
                 "mask_pixels": int(ref.sum())},
        details={"pages": int(x.shape[0]), "shape": list(x.shape), "threshold": THRESHOLD},
        notes=["agreement with the fp32 detector on rendered text, not accuracy against labelled boxes"],
        seconds=time.perf_counter() - start,
    )


def evaluate_classifier(target: Any = None, *, provider: str = "cpu", exact: bool = True,
                        progress: Progress = no_progress) -> TaskResult:
    """Orientation accuracy and agreement with fp32 of ``target`` (an ONNX path; None = fp32)."""
    start = time.perf_counter()
    reference, candidate = _runner(target, ppocr.CLS_MODEL, "ppocr-cls", provider, exact)
    x, truth = crops()
    progress(0, 2, "fp32")
    ref = reference({reference.input_names[0]: x})[0].argmax(-1)
    progress(1, 2, "candidate")
    cand = candidate({candidate.input_names[0]: x})[0].argmax(-1)
    progress(2, 2, "done")
    return TaskResult(
        task="ppocr-cls", model=target_label(target, "ppocr-cls (package ONNX, fp32)"), backend=candidate.backend,
        primary="accuracy",
        metrics={"accuracy": float((cand == truth).mean()), "agreement": float((cand == ref).mean()),
                 "fp32_accuracy": float((ref == truth).mean())},
        details={"crops": int(len(truth))},
        seconds=time.perf_counter() - start,
    )
