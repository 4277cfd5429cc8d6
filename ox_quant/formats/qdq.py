"""ONNX ``DequantizeLinear`` of a constant integer weight (QDQ): any use of the weight (MatMul,
Gemm, Gather, Conv, tied), which keeps its stored layout.

Opset 21 and newer: INT4/UINT4/INT8/UINT8 ``x``, per-tensor (scalar scale), per-axis (``axis``,
scale ``[N]``) or blocked (``axis``, ``block_size``, scale ``[ceil(K/B), N]`` or its transpose);
``y = (x - zero_point) * scale`` (``ox_quant.core.dequant.dequantize_linear``). Symmetric
weights are signed (codes - 2**(bits-1), no zero point); asymmetric ones unsigned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.dequant import dequantize_linear
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.formats.base import BITS_OF_DTYPE, Dequantized, QuantizedTensorInfo, TensorSource
from ox_quant.formats.base import const_bytes as _const_bytes
from ox_quant.formats.base import node_input as _input
from ox_quant.formats.base import proto_attr as _attr
from ox_quant.formats.writers import Packer, ProgressHook, Writer
from ox_quant.ir.sites import WeightSite
from ox_quant.ir.validate import ONNX_DOMAINS

QDQ_BITS = (4, 8)
QDQ_MIN_OPSET = 21  # INT4/UINT4 and block_size on DequantizeLinear
QDQ_MIN_IR_VERSION = 10  # INT4/UINT4 tensors
_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT2": 2, "UINT2": 2}


def qdq_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why DequantizeLinear cannot hold this config (None when it can)."""
    if config.bits not in QDQ_BITS:
        return f"DequantizeLinear takes 4- or 8-bit integers, not {config.bits}-bit"
    return None


def qdq_layout(site: WeightSite, config: QuantConfig) -> tuple[dict[str, int], tuple[int, ...]]:
    """DequantizeLinear attributes and scale shape for the weight *as stored*.

    ``KN`` (``[K, N]``): channel axis 1, blocks along axis 0 -> scale ``[nb, N]``.
    ``NK`` (``[N, K]`` or Conv ``[N, ...]``): channel axis 0, blocks along axis 1 -> ``[N, nb]``.
    """
    g = config.granularity
    n_axis, k_axis = (1, 0) if site.layout == "KN" else (0, 1)
    if g.per_tensor:
        return {}, ()
    if g.k_block is None:  # per-channel, channel-group: one value per output channel
        return {"axis": n_axis}, (site.n,)
    if len(site.stored_shape) != 2:
        raise ValueError("block scales need a rank-2 weight")
    nb = math.ceil(site.k / g.k_block)
    return {"axis": k_axis, "block_size": g.k_block}, ((nb, site.n) if site.layout == "KN" else (site.n, nb))


def qdq_dtype(config: QuantConfig) -> ir.DataType:
    """INT4/INT8 (symmetric: codes - mid, zero point 0) or UINT4/UINT8 (asymmetric)."""
    if config.bits == 4:
        return ir.DataType.INT4 if config.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if config.symmetric else ir.DataType.UINT8


def pack_for_qdq(site: WeightSite, config: QuantConfig) -> Packer:
    _, param_shape = qdq_layout(site, config)
    nk = site.layout == "NK"

    def params(a: np.ndarray, q: QuantizedWeight) -> np.ndarray:
        group = q.granularity.n_group
        if group is not None:  # one value per channel, repeated G times
            a = np.repeat(a[0], group)[: site.n]
        elif nk and a.ndim == 2:
            a = a.T
        return np.ascontiguousarray(a).reshape(param_shape)

    def stored(codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(codes.T).reshape(site.stored_shape) if nk else codes

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        if q.symmetric:
            codes = (q.codes.astype(np.int16) - config.mid).astype(np.int8)
            return {"q": stored(codes), "scale": params(q.scales, q)}
        return {"q": stored(q.codes), "scale": params(q.scales, q), "zero_point": params(q.zero_points, q)}

    return packer


def write_qdq(
    site: WeightSite,
    config: QuantConfig,
    used_names: set[str],
    on_done: ProgressHook | None,
    *,
    quantizer: Quantizer,
    stats: SiteStats | None = None,
) -> int:
    """Replace ``W`` by ``DequantizeLinear(W_q, scale[, zero_point])`` read by every use."""
    attributes, param_shape = qdq_layout(site, config)
    w = Writer(site, config, used_names, on_done, quantizer, stats)
    lazy = w.lazy(pack_for_qdq(site, config))
    q_dtype = qdq_dtype(config)
    inputs = [w.add(lazy, "q", q_dtype, site.stored_shape, "_Q"), w.add(lazy, "scale", w.scale_dtype, param_shape, "_scale")]
    if not config.symmetric:
        inputs.append(w.add(lazy, "zero_point", q_dtype, param_shape, "_zp"))
    meta = {"ox_quant.granularity": str(config.granularity), "ox_quant.bits": str(config.bits)}
    dq = ir.node("DequantizeLinear", inputs, attributes, name=w.name("_DequantizeLinear"), metadata_props=meta)
    dq.outputs[0].name = w.name("_dq")
    assert site.value.dtype is not None  # a site's dtype is one of SUPPORTED_DTYPES
    dq.outputs[0].dtype = site.value.dtype
    dq.outputs[0].shape = ir.Shape(site.stored_shape)
    if len(w.graph) > 0:
        w.graph.insert_before(w.graph.node(0), dq)
    else:
        w.graph.append(dq)
    for use in site.uses:
        use.node.replace_input_with(use.index, dq.outputs[0])
    return w.finish()


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


def describe_dq(node: ir.Node) -> QuantizedTensorInfo | None:
    x, scale, zp = _input(node, 0), _input(node, 1), _input(node, 2)
    if x is None or x.const_value is None or scale is None or scale.const_value is None:
        return None
    bits = BITS_OF_DTYPE.get(x.const_value.dtype)
    if bits is None:
        return None
    shape: tuple[int, ...] = tuple(x.const_value.shape)  # type: ignore[arg-type]  # stub: a tensor's dims are ints
    attrs = node.attributes
    block_attr = attrs["block_size"].as_int() if "block_size" in attrs else 0
    scale_rank = len(scale.const_value.shape)
    meta = _granularity_hint(node.metadata_props.get("ox_quant.granularity"))
    if meta:
        granularity, block = meta
    elif scale_rank == 0 or math.prod(scale.const_value.shape) == 1:  # type: ignore[arg-type]  # stub: int dims
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


def dequantize_node(node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
    """The output of a DequantizeLinear on an integer initializer (None for an activation)."""
    x_name = node.input[0]
    if x_name not in tensors:
        return None  # an activation, not a weight
    type_name = onnx.TensorProto.DataType.Name(tensors.dtype(x_name))
    if type_name not in _BITS:
        return None
    if node.input[1] not in tensors or (len(node.input) > 2 and node.input[2] and node.input[2] not in tensors):
        return "scale or zero point is not an initializer"
    zero_point = tensors.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    values = dequantize_linear(
        tensors.array(x_name),
        tensors.array(node.input[1]),
        zero_point,
        axis=int(_attr(node, "axis", 1)),
        block_size=int(_attr(node, "block_size", 0)),
    )
    return Dequantized(x_name, _BITS[type_name], values, "output")


class QDQFormat:
    """The registry entry of ``DequantizeLinear`` weights (see ``ox_quant.formats.base``)."""

    name = "qdq"
    domain = ""
    op_type = "DequantizeLinear"
    opset = QDQ_MIN_OPSET
    min_ir_version = QDQ_MIN_IR_VERSION
    code_input = 0

    def handles(self, domain: str, op_type: str) -> bool:
        return domain in ONNX_DOMAINS and op_type == self.op_type

    def rejects(self, config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
        return qdq_rejects(config, k, n, dtype)

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
        return write_qdq(site, config, used_names, on_done, quantizer=quantizer, stats=stats)

    def describe(self, node: ir.Node) -> QuantizedTensorInfo | None:
        return describe_dq(node)

    def check(self, node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
        """Nothing beyond ONNX's checker, which knows DequantizeLinear."""

    def dequantize(self, node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
        return dequantize_node(node, tensors)


QDQ = QDQFormat()
