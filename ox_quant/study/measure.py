"""Measuring one row: a converted model's stored bytes and layout, its task score."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ox_quant.errors import OxQuantError
from ox_quant.study.metrics import StudyMetric
from ox_quant.study.rows import Row


def scale_bytes(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(scale + zero-point bytes, quantized weights, their element count)`` of an ONNX file,
    any tool's (codes excluded), read from shapes and dtypes only."""
    import onnx_ir as ir

    from ox_quant.formats.base import BITS_OF_DTYPE
    from ox_quant.formats.registry import format_of
    from ox_quant.pipeline.load import load_model

    model = load_model(path)
    total, count, numel = 0, 0, 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        fmt = format_of(node.domain, node.op_type)
        info = fmt.describe(node) if fmt is not None else None
        if fmt is None or info is None:
            continue
        codes = node.inputs[fmt.code_input]
        tensor = codes.const_value if codes is not None else None
        code_bytes = 0
        if tensor is not None:
            bits = BITS_OF_DTYPE.get(tensor.dtype)
            code_bytes = -(-tensor.size * bits // 8) if bits is not None and bits < 8 else tensor.nbytes
        total += info.stored_bytes - code_bytes
        count += 1
        numel += info.numel
    return total, count, numel


def layout_of(entries: list[tuple[str, str, str]]) -> str:
    """``[(op, format, granularity)]`` -> ``"MatMul: matmulnbits block:128 x36; ..."``."""
    counts = Counter(entries)
    return "; ".join(f"{op}: {fmt} {gran} x{n}" for (op, fmt, gran), n in sorted(counts.items()))


class Scorer:
    """Scores ONNX files with the model's task, keeping per-study state (options, reference)."""

    def __init__(self, model: str, metric: StudyMetric, options: dict[str, Any], provider: str):
        from ox_quant_models.tasks import TASKS

        self.task = TASKS[model]
        self.evaluate = self.task.function()
        self.metric = metric
        self.options = options
        self.provider = provider

    def __call__(self, path: Path) -> tuple[dict[str, float], list[str], dict[str, Any], float]:
        start = time.perf_counter()
        result = self.evaluate(path, provider=self.provider, **self.options)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        if self.metric.name not in metrics:
            raise OxQuantError(f"task {self.task.name} did not report {self.metric.name}")
        return metrics, list(result.notes), dict(result.details), time.perf_counter() - start


def measure_row(base: dict[str, Any], scorer: Scorer, path: Path, fp32_value: float | None) -> Row:
    try:
        metrics, _, _, seconds = scorer(path)
    except OxQuantError as exc:
        return Row(**base, status="failed", reason=str(exc))
    value = metrics[scorer.metric.name]
    change = scorer.metric.change(value, fp32_value) if fp32_value is not None else None
    loss = scorer.metric.loss(value, fp32_value) if fp32_value is not None else None
    return Row(**base, status="ok", value=value, change=change, loss=loss, metrics=metrics, eval_seconds=seconds)


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()
