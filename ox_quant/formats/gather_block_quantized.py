"""``com.microsoft.GatherBlockQuantized`` (ONNX Runtime's contrib op): an embedding table read
only by ``Gather``, stored in blocks along the embedding axis.

Table ``[V, D]`` (``W = table.T``: K = D, N = V), ``gather_axis=0``, ``quantize_axis=1``:
``data: uint8[V, D*bits/8]`` (each row a little-endian bitstream of codes), ``scales:
[V, ceil(D/B)]`` in the table's dtype, optional ``zero_points: uint8[V, ceil(nb*bits/8)]``
(absent: ``2**(bits-1)``)::

    table[v, d] = (q[v, d] - zp[v, d // B]) * scale[v, d // B]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import DEFAULT_BLOCK_SIZE, QuantConfig
from ox_quant.core.packing import pack_bitstream, pack_zero_points, unpack_bitstream
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.errors import OxQuantError
from ox_quant.formats.base import BITS_OF_DTYPE, Dequantized, QuantizedTensorInfo, TensorSource
from ox_quant.formats.base import const_bytes as _const_bytes
from ox_quant.formats.base import int_attribute as _int_attribute
from ox_quant.formats.base import node_input as _input
from ox_quant.formats.base import proto_attr as _attr
from ox_quant.formats.base import proto_input as _proto_input
from ox_quant.formats.matmulnbits import MIN_BLOCK_SIZE, ms_block_op_rejects, valid_block_size
from ox_quant.formats.writers import ProgressHook, Writer
from ox_quant.ir.names import fresh_name
from ox_quant.ir.sites import WeightSite
from ox_quant.ir.validate import MS_DOMAIN


def gather_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why ``com.microsoft.GatherBlockQuantized`` cannot hold a table ``[V=N, D=K]``."""
    rejected = ms_block_op_rejects("GatherBlockQuantized", config, dtype, "the embedding")
    if rejected is None and (k * config.bits) % 8:
        return f"embedding width {k} x {config.bits} bits is not a whole number of bytes"
    return rejected


def write_gather_block_quantized(
    site: WeightSite,
    config: QuantConfig,
    used_names: set[str],
    on_done: ProgressHook | None,
    *,
    quantizer: Quantizer,
    stats: SiteStats | None = None,
) -> int:
    """Replace each ``Gather(table, ids)`` by ``com.microsoft.GatherBlockQuantized``.

    Table ``[V, D]`` (``W = table.T``: K = D, N = V): data ``uint8[V, D*bits/8]`` (each row a
    bitstream), scales ``[V, ceil(D/B)]``, zero points ``uint8[V, ceil(nb*bits/8)]``.
    """
    block = config.granularity.k_block
    assert block is not None
    v, d = site.n, site.k
    nb = math.ceil(d / block)

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        out = {"data": pack_bitstream(np.ascontiguousarray(q.codes.T), q.bits), "scales": np.ascontiguousarray(q.scales.T)}
        if not q.symmetric:
            out["zero_points"] = pack_zero_points(q.zero_points, q.bits).reshape(v, -1)
        return out

    w = Writer(site, config, used_names, on_done, quantizer, stats)
    lazy = w.lazy(packer)
    data = w.add(lazy, "data", ir.DataType.UINT8, (v, d * config.bits // 8), "_Q")
    scales = w.add(lazy, "scales", w.scale_dtype, (v, nb), "_scales")
    inputs: list[ir.Value | None] = [data, None, scales]
    if not config.symmetric:
        inputs.append(w.add(lazy, "zero_points", ir.DataType.UINT8, (v, math.ceil(nb * config.bits / 8)), "_zp"))
    attributes = {"block_size": block, "gather_axis": 0, "quantize_axis": 1, "bits": config.bits}
    for use in site.uses:
        node = use.node
        node_inputs = list(inputs)
        node_inputs[1] = node.inputs[1]
        name = fresh_name(used_names, (node.name or site.name) + "_GatherBlockQuantized")
        new = ir.node("GatherBlockQuantized", node_inputs, attributes, domain=MS_DOMAIN, name=name)
        w.replace_node(node, new)
    return w.finish()


def check_gather_block_quantized(node: onnx.NodeProto) -> None:
    """A ``com.microsoft.GatherBlockQuantized`` node has integer attributes in range."""
    label = f"GatherBlockQuantized node {node.name or '(unnamed)'!r}"
    bits = _int_attribute(node, "bits", 4, label)
    block = _int_attribute(node, "block_size", DEFAULT_BLOCK_SIZE, label)
    for key in ("gather_axis", "quantize_axis"):
        _int_attribute(node, key, 0, label)
    if not 2 <= bits <= 8:
        raise OxQuantError(f"{label}: bits={bits} is not between 2 and 8")
    if not valid_block_size(block):
        raise OxQuantError(f"{label}: block_size={block} is not a power of two >= {MIN_BLOCK_SIZE}")


def describe_gather_block_quantized(node: ir.Node) -> QuantizedTensorInfo | None:
    data, scales, zp = _input(node, 0), _input(node, 2), _input(node, 3)
    if data is None or data.const_value is None:
        return None
    attrs = node.attributes
    bits = attrs["bits"].as_int() if "bits" in attrs else BITS_OF_DTYPE.get(data.const_value.dtype, 4)
    shape: tuple[int, ...] = tuple(data.const_value.shape)  # type: ignore[arg-type]  # stub: a tensor's dims are ints
    if data.const_value.dtype == ir.DataType.UINT8 and bits < 8:  # packed uint8 storage
        shape = (*shape[:-1], shape[-1] * 8 // bits)
    return QuantizedTensorInfo(
        name=data.name or node.name or "GatherBlockQuantized",
        op="Gather",
        format="gather_block_quantized",
        shape=shape,
        bits=bits,
        granularity="block",
        block_size=attrs["block_size"].as_int() if "block_size" in attrs else DEFAULT_BLOCK_SIZE,
        symmetric=zp is None,
        stored_bytes=_const_bytes(data) + _const_bytes(scales) + _const_bytes(zp),
    )


def dequantize_gather_block_quantized(
    data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, bits: int, block_size: int
) -> np.ndarray:
    """The float table ``[V, D]`` of packed ``data: uint8[V, D*bits/8]`` (see module doc), in
    the dtype of ``scales``; arithmetic in float32."""
    v, nb = scales.shape
    d = data.shape[1] * 8 // bits
    if math.ceil(d / block_size) != nb:
        raise OxQuantError(f"GatherBlockQuantized scales {list(scales.shape)} do not match a [{v}, {d}] table in blocks of {block_size}")
    codes = unpack_bitstream(data, bits, d).astype(np.float32)
    if zero_points is None:
        zp = np.full((v, nb), 1 << (bits - 1), dtype=np.float32)
    else:
        zp = unpack_bitstream(zero_points.reshape(v, -1), bits, nb).astype(np.float32)
    block_of_d = np.arange(d) // block_size
    table = (codes - zp[:, block_of_d]) * scales.astype(np.float32)[:, block_of_d]
    return table.astype(scales.dtype, copy=False)


def dequantize_node(node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
    """``W[K, N] = table.T`` of a GatherBlockQuantized node on packed uint8 initializers."""
    data_name, scales_name, zp_name = node.input[0], _proto_input(node, 2), _proto_input(node, 3)
    if data_name not in tensors:
        return None  # the table is computed, not a stored weight
    if scales_name not in tensors or (zp_name and zp_name not in tensors):
        return "scales or zero points are not initializers"
    if int(_attr(node, "gather_axis", 0)) != 0 or int(_attr(node, "quantize_axis", 1)) not in (1, -1):
        return "GatherBlockQuantized other than gather_axis=0, quantize_axis=1 is not supported"
    if tensors.dtype(data_name) != onnx.TensorProto.UINT8:
        return "GatherBlockQuantized data other than packed uint8 is not supported"
    bits = int(_attr(node, "bits", 4))
    data = tensors.array(data_name)
    table = dequantize_gather_block_quantized(
        data.reshape(data.shape[0], -1),
        tensors.array(scales_name).reshape(data.shape[0], -1),
        tensors.array(zp_name) if zp_name else None,
        bits=bits,
        block_size=int(_attr(node, "block_size", DEFAULT_BLOCK_SIZE)),
    )
    return Dequantized(data_name, bits, np.ascontiguousarray(table.T), "kn")


class GatherBlockQuantizedFormat:
    """The registry entry of ``com.microsoft.GatherBlockQuantized`` (see ``ox_quant.formats.base``)."""

    name = "gather_block_quantized"
    domain = MS_DOMAIN
    op_type = "GatherBlockQuantized"
    opset = 1
    min_ir_version = 0
    code_input = 0

    def handles(self, domain: str, op_type: str) -> bool:
        return domain == self.domain and op_type == self.op_type

    def rejects(self, config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
        return gather_rejects(config, k, n, dtype)

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
        return write_gather_block_quantized(site, config, used_names, on_done, quantizer=quantizer, stats=stats)

    def describe(self, node: ir.Node) -> QuantizedTensorInfo | None:
        return describe_gather_block_quantized(node)

    def check(self, node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
        check_gather_block_quantized(node)

    def dequantize(self, node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
        return dequantize_node(node, tensors)


GATHER_BLOCK_QUANTIZED = GatherBlockQuantizedFormat()
