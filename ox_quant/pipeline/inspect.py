"""Describe the quantized weights of any ONNX model: ox-quant's or another tool's.

Recognised: ``com.microsoft`` MatMulNBits, ``com.microsoft`` GatherBlockQuantized,
ox-quant custom ops (domain ``ox_quant``, MatMulNBits-like inputs), and
DequantizeLinear of a constant integer tensor. Only shapes, dtypes and attributes are
read (no weight data), so inspecting a large model is cheap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from ox_quant.ir.modelio import load_model, model_bytes

BITS_OF_DTYPE = {
    ir.DataType.INT4: 4,
    ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8,
    ir.DataType.UINT8: 8,
    ir.DataType.INT16: 16,
    ir.DataType.UINT16: 16,
}
for _name, _bits in (("INT2", 2), ("UINT2", 2)):
    if hasattr(ir.DataType, _name):
        BITS_OF_DTYPE[getattr(ir.DataType, _name)] = _bits


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """One quantized weight found in a model. ``numel`` counts logical weights."""

    name: str
    op: str
    format: str
    shape: tuple[int, ...]
    bits: int
    granularity: str
    block_size: int | None
    symmetric: bool
    stored_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / self.numel if self.numel else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "op": self.op,
            "format": self.format,
            "shape": list(self.shape),
            "bits": self.bits,
            "granularity": self.granularity,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "stored_bytes": self.stored_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
        }


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


def _const_bytes(value: ir.Value | None) -> int:
    if value is None or value.const_value is None:
        return 0
    tensor = value.const_value
    bits = BITS_OF_DTYPE.get(tensor.dtype)
    if bits is not None and bits < 8:
        return math.ceil(math.prod(tensor.shape) * bits / 8)
    return tensor.nbytes


def _input(node: ir.Node, i: int) -> ir.Value | None:
    """Input ``i``, seen through a ``Reshape``/``Unsqueeze`` of a constant (a tied table's
    GatherBlockQuantized reads MatMulNBits' scales that way)."""
    value = node.inputs[i] if len(node.inputs) > i else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type in ("Reshape", "Unsqueeze") and producer.domain in ("", "ai.onnx"):
        source = producer.inputs[0]
        if source is not None and source.const_value is not None:
            return source
    return value


STORED_INPUTS = {"MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3), "DequantizeLinear": (0, 1, 2)}


def _stored_values(node: ir.Node) -> list[ir.Value]:
    """The constant tensors a quantized node reads its weight from (codes, scales, zero points)."""
    indices = STORED_INPUTS.get(node.op_type, (1, 2, 3))  # ox_quant custom ops: MatMulNBits' order
    values = [_input(node, i) for i in indices]
    return [v for v in values if v is not None and v.const_value is not None]


def _merge(first: QuantizedTensorInfo, other: QuantizedTensorInfo, stored_bytes: int) -> QuantizedTensorInfo:
    """One weight read by several nodes (a shared or tied table): the bytes stored once, the
    ops and formats of every reader, a projection's ``[K, N]`` shape over a lookup's."""
    if first.op == "Gather" and other.op != "Gather":
        first, other = other, first
    ops = sorted(set(first.op.split("+")) | set(other.op.split("+")), key=lambda op: (op != "Gather", op))
    formats = sorted(set(first.format.split("+")) | set(other.format.split("+")))
    return replace(first, op="+".join(ops), format="+".join(formats), stored_bytes=stored_bytes)


def _describe_nbits(node: ir.Node, fmt: str) -> QuantizedTensorInfo | None:
    attrs = node.attributes
    if "K" not in attrs or "N" not in attrs:
        return None
    k, n = attrs["K"].as_int(), attrs["N"].as_int()
    bits = attrs["bits"].as_int() if "bits" in attrs else 4
    bs = attrs["block_size"].as_int()
    b, scales, zp = _input(node, 1), _input(node, 2), _input(node, 3)
    group = attrs["channel_group_size"].as_int() if "channel_group_size" in attrs else 1
    if fmt == "custom" and bs >= k and group >= n:  # one block of K, one group of N
        granularity, block = ("tensor", None)
    elif group > 1:
        granularity, block = ("channel-group", group)
    elif fmt == "custom" and bs >= k:  # ox-quant writes per-channel as one block of K
        granularity, block = ("channel", -1)
    else:
        granularity, block = ("block", bs)
    name = b.name if b is not None and b.name else node.name or node.op_type
    return QuantizedTensorInfo(
        name=name,
        op=node.op_type,
        format=fmt,
        shape=(k, n),
        bits=bits,
        granularity=granularity,
        block_size=block,
        symmetric=zp is None,
        stored_bytes=_const_bytes(b) + _const_bytes(scales) + _const_bytes(zp),
    )


def _describe_gather_block_quantized(node: ir.Node) -> QuantizedTensorInfo | None:
    data, scales, zp = _input(node, 0), _input(node, 2), _input(node, 3)
    if data is None or data.const_value is None:
        return None
    attrs = node.attributes
    bits = attrs["bits"].as_int() if "bits" in attrs else BITS_OF_DTYPE.get(data.const_value.dtype, 4)
    shape = tuple(data.const_value.shape)
    if data.const_value.dtype == ir.DataType.UINT8 and bits < 8:  # packed uint8 storage
        shape = (*shape[:-1], shape[-1] * 8 // bits)
    return QuantizedTensorInfo(
        name=data.name or node.name or "GatherBlockQuantized",
        op="Gather",
        format="gather_block_quantized",
        shape=shape,
        bits=bits,
        granularity="block",
        block_size=attrs["block_size"].as_int() if "block_size" in attrs else 128,
        symmetric=zp is None,
        stored_bytes=_const_bytes(data) + _const_bytes(scales) + _const_bytes(zp),
    )


def _granularity_hint(meta: str | None) -> tuple[str, int | None] | None:
    """``(granularity, block_size)`` from ox-quant's DequantizeLinear metadata; None when the
    hint is absent or malformed (then the layout is read from the tensors instead)."""
    if not meta:
        return None
    kind, _, size = meta.partition(":")
    if kind in ("block", "channel-group") and size.isascii() and size.isdigit() and int(size) > 0:
        return kind, int(size)
    if not size and kind in ("tensor", "channel"):
        return kind, (-1 if kind == "channel" else None)
    return None


def _bits_hint(meta: str | None, stored: int) -> int:
    """Bits from ox-quant's ``ox_quant.bits`` metadata when sane, else the stored dtype's."""
    return int(meta) if meta is not None and meta.isascii() and meta.isdigit() and 2 <= int(meta) <= stored else stored


def _describe_dq(node: ir.Node) -> QuantizedTensorInfo | None:
    x, scale, zp = _input(node, 0), _input(node, 1), _input(node, 2)
    if x is None or x.const_value is None or scale is None or scale.const_value is None:
        return None
    bits = BITS_OF_DTYPE.get(x.const_value.dtype)
    if bits is None:
        return None
    shape = tuple(x.const_value.shape)
    attrs = node.attributes
    block_attr = attrs["block_size"].as_int() if "block_size" in attrs else 0
    scale_rank = len(scale.const_value.shape)
    meta = _granularity_hint(node.metadata_props.get("ox_quant.granularity"))
    if meta:
        granularity, block = meta
    elif scale_rank == 0 or math.prod(scale.const_value.shape) == 1:
        granularity, block = "tensor", None
    elif block_attr:
        granularity, block = "block", block_attr
    else:
        granularity, block = "channel", -1
    consumers = {u.node.op_type for u in node.outputs[0].uses()}
    signed = x.const_value.dtype in (ir.DataType.INT4, ir.DataType.INT8, ir.DataType.INT16)
    return QuantizedTensorInfo(
        name=x.name or node.name or "DequantizeLinear",
        op="/".join(sorted(consumers)) or "-",
        format="qdq",
        shape=shape,
        bits=_bits_hint(node.metadata_props.get("ox_quant.bits"), bits),
        granularity=granularity,
        block_size=block,
        symmetric=zp is None or signed,
        stored_bytes=_const_bytes(x) + _const_bytes(scale) + _const_bytes(zp),
    )


def describe_node(node: ir.Node) -> QuantizedTensorInfo | None:
    """The quantized weight a node holds, or None."""
    if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
        return _describe_nbits(node, "matmulnbits")
    if node.domain == "com.microsoft" and node.op_type == "GatherBlockQuantized":
        return _describe_gather_block_quantized(node)
    if node.domain == "ox_quant":
        return _describe_nbits(node, "custom")
    if node.domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear":
        return _describe_dq(node)
    return None


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
            info = _merge(first, info, sum(_const_bytes(v) for v in seen.values()))
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
