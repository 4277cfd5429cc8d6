"""The protocol every on-disk format of a quantized weight implements, and what they share.

A format (one module in ``ox_quant.formats``, listed in ``ox_quant.formats.registry``) knows:
which configs it can hold and why not (``rejects``), how to write a weight site
(``write``), how to describe one of its nodes for ``inspect`` (``describe``, shapes and
attributes only), how to check one of its nodes when a model is loaded (``check``), how to
dequantize one of its nodes to the float weight (``dequantize``, for ``verify --per-layer``),
and which input holds the codes (``code_input``, for the scale-byte count of reports).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.errors import OxQuantError

if TYPE_CHECKING:
    from ox_quant.algorithms.base import Quantizer, SiteStats
    from ox_quant.core.config import QuantConfig
    from ox_quant.ir.sites import WeightSite

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


def const_bytes(value: ir.Value | None) -> int:
    """Bytes a constant input occupies on disk (sub-byte dtypes packed); 0 for a non-constant."""
    if value is None or value.const_value is None:
        return 0
    tensor = value.const_value
    bits = BITS_OF_DTYPE.get(tensor.dtype)
    if bits is not None and bits < 8:
        return math.ceil(math.prod(tensor.shape) * bits / 8)  # type: ignore[arg-type]  # stub: a tensor's dims are ints
    return tensor.nbytes


def node_input(node: ir.Node, i: int) -> ir.Value | None:
    """Input ``i`` of ``node`` (None when absent), seen through a ``Reshape``/``Unsqueeze`` of a
    constant (a tied table's GatherBlockQuantized reads MatMulNBits' scales that way)."""
    value = node.inputs[i] if len(node.inputs) > i else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type in ("Reshape", "Unsqueeze") and producer.domain in ("", "ai.onnx"):
        source = producer.inputs[0]
        if source is not None and source.const_value is not None:
            return source
    return value


def proto_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of an ``onnx.NodeProto``, or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def proto_input(node: onnx.NodeProto, i: int) -> str:
    """The name of input ``i`` of an ``onnx.NodeProto`` ("" when absent or omitted)."""
    return node.input[i] if len(node.input) > i else ""


def int_attribute(node: onnx.NodeProto, key: str, default: int | None, label: str) -> int:
    """An integer attribute of a node being checked; ``OxQuantError`` when not an integer,
    or when missing without a default."""
    for attr in node.attribute:
        if attr.name == key:
            if attr.type != onnx.AttributeProto.INT:
                raise OxQuantError(f"{label}: attribute {key} is not an integer")
            return attr.i
    if default is None:
        raise OxQuantError(f"{label}: required attribute {key} is missing")
    return default


class TensorSource(Protocol):
    """The initializers of a model, read on demand (``ox_quant.verification.per_layer``)."""

    def __contains__(self, name: str) -> bool: ...

    def array(self, name: str) -> np.ndarray: ...

    def dtype(self, name: str) -> int:
        """The ``onnx.TensorProto`` data type of initializer ``name``."""
        ...


@dataclass(frozen=True)
class Dequantized:
    """A quantized weight read back as floats.

    ``layout``: ``"kn"`` -- ``values`` is ``W[K, N]`` of the node's MatMul (or, for a Gather
    table ``[V, D]``, ``W = table.T``, K = D, N = V); ``"output"`` -- ``values`` is the
    tensor the node outputs (a DequantizeLinear's output, in the stored layout).
    """

    name: str
    bits: int
    values: np.ndarray
    layout: Literal["kn", "output"]


class QuantFormat(Protocol):
    """One on-disk format of quantized weights (see the module docstring)."""

    name: str
    """As in reports and ``FormatChoice.format``: ``matmulnbits``, ``qdq``, ..."""
    domain: str
    """Opset domain of its nodes ("" for ai.onnx)."""
    op_type: str
    """Type of its nodes (``MatMulNBits``, ``DequantizeLinear``, ...), as reports name them."""
    opset: int
    """Version of ``domain`` a written model imports (ai.onnx: the least opset it needs)."""
    min_ir_version: int
    """Least IR version a written model needs (0: no requirement)."""
    code_input: int
    """Index of the node input holding the integer codes."""

    def handles(self, domain: str, op_type: str) -> bool:
        """Whether a node of this domain and type is one of this format's."""
        ...

    def rejects(self, config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
        """Why this format cannot hold ``config`` for a ``[K, N]`` weight of ``dtype`` (None: it can)."""
        ...

    def write(
        self,
        site: WeightSite,
        config: QuantConfig,
        used_names: set[str],
        on_done: Callable[[str], None] | None,
        *,
        quantizer: Quantizer,
        stats: SiteStats | None = None,
    ) -> int:
        """Replace ``site``'s uses by this format's nodes; return the stored bytes."""
        ...

    def describe(self, node: ir.Node) -> QuantizedTensorInfo | None:
        """The quantized weight the node holds (shapes and attributes only), or None."""
        ...

    def check(self, node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
        """Raise ``OxQuantError`` when the node's attributes or constant input shapes (``dims``:
        initializers in scope) are inconsistent."""
        ...

    def dequantize(self, node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
        """The node's weight as floats; a reason when it cannot be read; None when the node
        holds no quantized weight (e.g. a DequantizeLinear of an activation)."""
        ...
