"""Loading a model for the pipeline: ``ox_quant.ir.modelio.load_model`` (graph validation,
memory-mapped weights) plus the checks of every registered format's quantized nodes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from ox_quant.formats.registry import check_quantized_nodes
from ox_quant.ir import modelio


def load_model(
    path: str | os.PathLike,
    runnable: bool = False,
    runtime_check: Callable[[onnx.ModelProto, Path], None] | None = None,
) -> ir.Model:
    """Load and validate ``path`` (see ``ox_quant.ir.modelio.load_model``); quantized nodes are
    checked after the graph checks and before ``runtime_check``."""

    def checks(proto: onnx.ModelProto, model_path: Path) -> None:
        check_quantized_nodes(proto)
        if runtime_check is not None:
            runtime_check(proto, model_path)

    return modelio.load_model(path, runnable, checks)
