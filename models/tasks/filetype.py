"""magika's file-type model, scored by agreement with its own fp32 labels on this repository's files.

Inputs: up to ``FILES`` files of the repository (every tracked kind of text: Python, Markdown,
shell, TOML, C++/CUDA sources, ...), taken evenly from the sorted list of its files outside
hidden and build folders, turned into features as magika does (``models.magika.features``).
``agreement``: the share of files whose arg-max label equals the fp32 model's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.evaluation.tasks import OrtRunner, Progress, TaskResult, is_onnx_path, no_progress, target_label
from ox_quant_models import magika

FILES = 64
SKIP_DIRS = {"lib", "build", "__pycache__", "node_modules"}
SKIP_SUFFIXES = {".onnx", ".data", ".so", ".png", ".npz", ".pyc"}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def sample_files(root: Path | None = None, count: int = FILES) -> list[Path]:
    """Up to ``count`` files of the repository, evenly spaced in sorted order."""
    root = root or repo_root()
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if not path.is_file() or any(p.startswith(".") or p in SKIP_DIRS for p in rel[:-1]):
            continue
        if rel[-1].startswith(".") or path.suffix in SKIP_SUFFIXES or path.stat().st_size == 0:
            continue
        found.append(path)
    if len(found) <= count:
        return found
    step = len(found) / count
    return [found[int(i * step)] for i in range(count)]


def inputs() -> np.ndarray:
    """``int32 [N, 2048]``: features of :func:`sample_files`."""
    return magika.read_features(sample_files())


def evaluate(target: Any = None, *, provider: str = "cpu", exact: bool = True,
             progress: Progress = no_progress) -> TaskResult:
    """Label agreement of ``target`` (an ONNX path; None = the package's fp32 model) with fp32."""
    start = time.perf_counter()
    if target is not None and not is_onnx_path(target):
        raise OxQuantError("the magika task scores ONNX files only (the model has no PyTorch form)")
    path = magika.onnx_path() if target is None else Path(target)
    if not path.is_file():
        raise OxQuantError(f"model file {path} does not exist")
    reference = OrtRunner(magika.onnx_path(), provider=provider, exact=exact)
    candidate = OrtRunner(path, provider=provider, exact=exact)
    x = inputs()
    progress(0, 2, "fp32")
    ref = reference({reference.input_names[0]: x})[0].argmax(-1)
    progress(1, 2, "candidate")
    cand = candidate({candidate.input_names[0]: x})[0].argmax(-1)
    progress(2, 2, "done")
    names = magika.labels()
    return TaskResult(
        task="magika", model=target_label(target, "magika (package ONNX, fp32)"), backend=candidate.backend,
        primary="agreement", metrics={"agreement": float((cand == ref).mean()), "files": int(len(x))},
        details={"fp32_labels": sorted({names[i] for i in ref})},
        notes=["agreement with the fp32 model's labels on this repository's files, not accuracy"],
        seconds=time.perf_counter() - start,
    )
