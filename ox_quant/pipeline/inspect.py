"""Describe the quantized weights of any ONNX model: ox-quant's or another tool's.

Recognised: every format of ``ox_quant.formats.registry`` -- ``com.microsoft`` MatMulNBits,
``com.microsoft`` GatherBlockQuantized, ox-quant custom ops (domain ``ox_quant``,
MatMulNBits-like inputs), and DequantizeLinear of a constant integer tensor. Only shapes,
dtypes and attributes are read (no weight data), so inspecting a large model is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from ox_quant.formats.base import BITS_OF_DTYPE, QuantizedTensorInfo  # noqa: F401 (re-exported)
from ox_quant.formats.registry import format_of
from ox_quant.ir.modelio import model_bytes
from ox_quant.pipeline.load import load_model


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    ir_version: int
    opsets: dict[str, int]
    num_nodes: int
    model_bytes: int
    float_weights: int
    float_weight_bytes: int
    quantized: tuple[QuantizedTensorInfo, ...]

    @property
    def bits_per_weight(self) -> float | None:
        numel = sum(q.numel for q in self.quantized)
        return sum(q.stored_bytes for q in self.quantized) * 8 / numel if numel else None

    def as_dict(self) -> dict[str, object]:
        bpw = self.bits_per_weight
        return {
            "path": str(self.path),
            "ir_version": self.ir_version,
            "opsets": self.opsets,
            "num_nodes": self.num_nodes,
            "model_bytes": self.model_bytes,
            "float_weights": self.float_weights,
            "float_weight_bytes": self.float_weight_bytes,
            "quantized": [q.as_dict() for q in self.quantized],
            "bits_per_weight": round(bpw, 4) if bpw is not None else None,
        }


def describe_node(node: ir.Node) -> QuantizedTensorInfo | None:
    """The quantized weight a node holds, or None (the node's format describes it)."""
    fmt = format_of(node.domain, node.op_type)
    return fmt.describe(node) if fmt is not None else None


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """Describe ``path``: its quantized weights and its remaining float weights."""
    model = load_model(path)
    quantized = []
    num_nodes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        num_nodes += 1
        info = describe_node(node)
        if info is not None:
            quantized.append(info)
    floats = [
        v.const_value
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    ]
    return ModelInfo(
        path=Path(path),
        ir_version=model.ir_version,
        opsets=dict(model.opset_imports),
        num_nodes=num_nodes,
        model_bytes=model_bytes(path),
        float_weights=len(floats),
        float_weight_bytes=sum(t.nbytes for t in floats),
        quantized=tuple(quantized),
    )
