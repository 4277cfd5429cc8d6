"""PP-OCRv4 recogniser task: character error rate on text lines rendered with Pillow.

Lines (``LINES``, written for ox-quant) are drawn black on white with Pillow's
built-in scalable font (no system fonts needed), resized to height 48 (bilinear,
aspect kept), scaled to [-1, 1] and right-padded with zeros to at least 320 columns,
as PaddleOCR does. Decoding is CTC greedy: arg-max per column, repeats merged,
blanks dropped. ``CER = sum_lines edit_distance(pred, truth) / sum_lines len(truth)``.

Metrics: ``cer`` (primary), ``line_accuracy`` (fraction of lines read exactly).
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

LINES: tuple[str, ...] = (
    "Quantized weights must keep their accuracy.",
    "The invoice total is 1,284.50 EUR (due 12/03).",
    "Call 555-0199 before 6 pm on Friday!",
    "Block size 128 gives 4.25 bits per weight.",
    "Emma Woodhouse, handsome, clever, and rich",
    "ONNX Runtime loads the model in 0.8 seconds.",
    "Room 42B, 7th floor; keys at the front desk.",
    "She sold 17 apples and 9 pears at the market.",
)
FONT_SIZE = 30
MARGIN = 8


def render(text: str, size: int = FONT_SIZE) -> np.ndarray:
    """``uint8 [H, W, 3]``: ``text`` in black on white with a margin of ``MARGIN`` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (int(right - left + 2 * MARGIN), int(bottom - top + 2 * MARGIN)), "white")
    ImageDraw.Draw(image).text((MARGIN - left, MARGIN - top), text, fill="black", font=font)
    return np.asarray(image)


def preprocess(image: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3] -> float32 [1, 3, 48, max(320, W')]`` with ``W' = ceil(48 W / H)``."""
    from PIL import Image

    h, w = image.shape[:2]
    width = math.ceil(ppocr.HEIGHT * w / h)
    resized = np.asarray(Image.fromarray(image).resize((width, ppocr.HEIGHT), Image.Resampling.BILINEAR), dtype=np.float32)
    chw = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((1, 3, ppocr.HEIGHT, max(ppocr.MIN_WIDTH, width)), dtype=np.float32)
    out[0, :, :, :width] = chw
    return out


def ctc_greedy(probs: np.ndarray, charset: list[str]) -> str:
    """``[T, C]`` class scores -> text: arg-max, merge repeats, drop blank (class 0)."""
    best = probs.argmax(-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
    return "".join(charset[i] for i in best[keep])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert, delete, substitute)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def evaluate(target: Any = None, *, provider: str = "cpu", exact: bool = True,
             progress: Progress = no_progress) -> TaskResult:
    """CER of ``target``: None (the package's ONNX as shipped) or an ONNX path."""
    start = time.perf_counter()
    if target is not None and not is_onnx_path(target):
        raise OxQuantError("the ppocr-rec task scores ONNX files only (the model has no PyTorch form)")
    path = ppocr.onnx_path() if target is None else Path(target)
    if not path.is_file():
        raise OxQuantError(f"model file {path} does not exist")
    runner = OrtRunner(path, provider=provider, exact=exact)
    charset = ppocr.characters(path)
    errors, chars, read_exactly = 0, 0, 0
    predictions = []
    for i, line in enumerate(LINES):
        progress(i, len(LINES), f"line {i + 1}/{len(LINES)}")
        (probs,) = runner({runner.input_names[0]: preprocess(render(line))})[:1]
        text = ctc_greedy(probs[0], charset).strip()
        predictions.append(text)
        errors += edit_distance(text, line)
        chars += len(line)
        read_exactly += text == line
    progress(len(LINES), len(LINES), "done")
    return TaskResult(
        task="ppocr-rec",
        model=target_label(target, "ppocr-rec (package ONNX, fp32)"),
        backend=runner.backend,
        primary="cer",
        metrics={"cer": errors / chars, "line_accuracy": read_exactly / len(LINES), "characters": chars},
        details={"lines": len(LINES), "predictions": predictions},
        seconds=time.perf_counter() - start,
    )

