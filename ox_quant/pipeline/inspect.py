"""Describe the quantized weights of any ONNX model: ox-quant's or another tool's.

Recognised: every format of ``ox_quant.formats.registry`` -- ``com.microsoft`` MatMulNBits,
``com.microsoft`` GatherBlockQuantized, ox-quant custom ops (domain ``ox_quant``,
MatMulNBits-like inputs), and DequantizeLinear of a constant integer tensor. Only shapes,
dtypes and attributes are read (no weight data), so inspecting a large model is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from ox_quant.formats.base import BITS_OF_DTYPE, QuantizedTensorInfo, const_bytes, node_input  # noqa: F401 (BITS_OF_DTYPE re-exported)
from ox_quant.formats.registry import format_of
from ox_quant.ir.modelio import model_bytes
from ox_quant.pipeline.load import load_model


@dataclass(frozen=True)
class ModelInfo:
    """``float_weights``: float tensors left as float, initializers plus tensors held by
    ``Constant`` nodes (``float_constants`` of them); scales of quantized weights excluded."""

    path: Path
    ir_version: int
    opsets: dict[str, int]
    num_nodes: int
    model_bytes: int
    float_weights: int
    float_weight_bytes: int
    quantized: tuple[QuantizedTensorInfo, ...]
    float_constants: int = 0

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
            "float_constants": self.float_constants,
            "quantized": [q.as_dict() for q in self.quantized],
            "bits_per_weight": round(bpw, 4) if bpw is not None else None,
        }


STORED_INPUTS = {"MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3), "DequantizeLinear": (0, 1, 2)}


def _stored_values(node: ir.Node) -> list[ir.Value]:
    """The constant tensors a quantized node reads its weight from (codes, scales, zero points)."""
    indices = STORED_INPUTS.get(node.op_type, (1, 2, 3))  # ox_quant custom ops: MatMulNBits' order
    values = [node_input(node, i) for i in indices]
    return [v for v in values if v is not None and v.const_value is not None]


def _merge(first: QuantizedTensorInfo, other: QuantizedTensorInfo, stored_bytes: int) -> QuantizedTensorInfo:
    """One weight read by several nodes (a shared or tied table): the bytes stored once, the
    ops and formats of every reader, a projection's ``[K, N]`` shape over a lookup's."""
    if first.op == "Gather" and other.op != "Gather":
        first, other = other, first
    ops = sorted(set(first.op.split("+")) | set(other.op.split("+")), key=lambda op: (op != "Gather", op))
    formats = sorted(set(first.format.split("+")) | set(other.format.split("+")))
    return replace(first, op="+".join(ops), format="+".join(formats), stored_bytes=stored_bytes)


def describe_node(node: ir.Node) -> QuantizedTensorInfo | None:
    """The quantized weight a node holds, or None (the node's format describes it)."""
    fmt = format_of(node.domain, node.op_type)
    return fmt.describe(node) if fmt is not None else None


FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
# Inputs that hold a quantized weight's codes, scales and zero points, per op.
_PARAM_INPUTS = {"MatMulNBits": (1, 2, 3, 4), "GatherBlockQuantized": (0, 2, 3), "DequantizeLinear": (0, 1, 2)}


def _quant_params(node: ir.Node) -> list[ir.Value]:
    """The inputs of a quantized node that belong to its weight (not its activation or bias)."""
    indices = _PARAM_INPUTS.get(node.op_type, (1, 2, 3, 4))
    return [v for i, v in enumerate(node.inputs) if i in indices and v is not None]


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a ``Constant`` node holds in its ``value`` attribute, if any."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("value")
    return attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """Describe ``path``: its quantized weights and its remaining float weights
    (initializers and ``Constant`` nodes)."""
    model = load_model(path)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    found: dict[int, tuple[QuantizedTensorInfo, dict[int, ir.Value]]] = {}
    params: set[int] = set()  # ids of the values that hold quantized weights' codes and scales
    for node in nodes:
        info = describe_node(node)
        if info is None:
            continue
        params |= {id(v) for v in _quant_params(node)}
        stored = _stored_values(node)
        values = {id(v): v for v in stored}
        key = id(stored[0]) if stored else id(node)  # the codes' tensor identifies the weight
        if key in found:  # the same stored weight, read by another node
            first, seen = found[key]
            seen.update(values)
            info = _merge(first, info, sum(const_bytes(v) for v in seen.values()))
            values = seen
        found[key] = (info, values)
    quantized = [info for info, _ in found.values()]
    constants = [
        tensor
        for node in nodes
        if (tensor := _constant_tensor(node)) is not None and tensor.dtype in FLOAT_TYPES and id(node.outputs[0]) not in params
    ]
    floats = [
        v.const_value
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES and id(v) not in params
    ]
    return ModelInfo(
        path=Path(path),
        ir_version=model.ir_version,
        opsets=dict(model.opset_imports),
        num_nodes=len(nodes),
        model_bytes=model_bytes(path),
        float_weights=len(floats) + len(constants),
        float_weight_bytes=sum(t.nbytes for t in floats) + sum(t.nbytes for t in constants),
        quantized=tuple(quantized),
        float_constants=len(constants),
    )
