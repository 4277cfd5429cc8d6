"""``com.microsoft.MatMulNBits`` (ONNX Runtime's contrib op): ``Y = A @ W (+ bias)`` for a
MatMul or Gemm weight ``W[K, N]`` stored as blocks of ``block_size`` codes along K.

Inputs: ``B: uint8[N, n_blocks, blob]`` (blob = block_size * bits / 8, codes low bits first),
``scales: [N * n_blocks]`` in the activation dtype, optional ``zero_points:
uint8[N * ceil(n_blocks * bits / 8)]`` (absent: ``2**(bits-1)``); layout in
``ox_quant.core.dequant``. ONNX Runtime's CPU kernels take bits 2, 4, 8 and block sizes that
are powers of two from 16 (:func:`valid_block_size`); ox-quant writes 16..256.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.dequant import dequantize_matmulnbits
from ox_quant.core.packing import pack_matmulnbits, pack_zero_points
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.errors import OxQuantError
from ox_quant.formats.base import Dequantized, QuantizedTensorInfo, TensorSource
from ox_quant.formats.base import const_bytes as _const_bytes
from ox_quant.formats.base import int_attribute as _int_attribute
from ox_quant.formats.base import node_input as _input
from ox_quant.formats.base import proto_attr as _attr
from ox_quant.formats.writers import Packer, ProgressHook, Writer, _write_nbits_nodes
from ox_quant.ir.sites import WeightSite
from ox_quant.ir.validate import MS_DOMAIN

MIN_BLOCK_SIZE = 16
MAX_WRITTEN_BLOCK_SIZE = 256
FLOAT_DTYPES = ("FLOAT", "FLOAT16")  # activation dtypes MatMulNBits accepts on CPU


def valid_block_size(block: int) -> bool:
    """ONNX Runtime's MatMulNBits (and GatherBlockQuantized) block-size rule: a power of two >= 16."""
    return block >= MIN_BLOCK_SIZE and not block & (block - 1)


MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_BLOCK_SIZES = tuple(b for b in range(MIN_BLOCK_SIZE, MAX_WRITTEN_BLOCK_SIZE + 1) if valid_block_size(b))
"""Block sizes ox-quant writes: 16, 32, 64, 128, 256."""


def ms_block_op_rejects(op: str, config: QuantConfig, dtype: str, along: str) -> str | None:
    """The limits ONNX Runtime's CPU kernels of MatMulNBits and GatherBlockQuantized share."""
    if config.bits not in MATMULNBITS_BITS:
        return f"{op} takes {'/'.join(map(str, MATMULNBITS_BITS))} bits, not {config.bits}"
    block = config.granularity.k_block
    if block is None:
        return f"{op} needs block scales along {along}, not {config.granularity.name} scales"
    if block not in MATMULNBITS_BLOCK_SIZES:
        return f"{op} block size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_WRITTEN_BLOCK_SIZE}, not {block}"
    if dtype not in FLOAT_DTYPES:
        return f"{op} takes float32/float16 weights, not {dtype.lower()}"
    return None


def matmulnbits_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why MatMulNBits cannot hold this config (None when it can)."""
    return ms_block_op_rejects("MatMulNBits", config, dtype, "K")


def matmulnbits_shapes(k: int, n: int, config: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Input shapes of MatMulNBits: B ``[N, nb, blob]``, scales ``[N*nb]``, zero points."""
    bs = config.granularity.k_block
    assert bs is not None
    nb = math.ceil(k / bs)
    shapes = {"B": (n, nb, math.ceil(bs * config.bits / 8)), "scales": (n * nb,)}
    if not config.symmetric:
        shapes["zero_points"] = (n * math.ceil(nb * config.bits / 8),)
    return shapes


def pack_for_matmulnbits(config: QuantConfig) -> Packer:
    """Codes/scales/zero points ``[nb, N]`` -> MatMulNBits inputs (N-major)."""
    bs = config.granularity.k_block
    assert bs is not None

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        out = {
            "B": pack_matmulnbits(q.codes, q.bits, bs, pad_code=0),
            "scales": np.ascontiguousarray(q.scales.T).reshape(-1),
        }
        if not q.symmetric:
            out["zero_points"] = pack_zero_points(q.zero_points, q.bits)
        return out

    return packer


def write_matmulnbits(
    site: WeightSite,
    config: QuantConfig,
    used_names: set[str],
    on_done: ProgressHook | None,
    *,
    quantizer: Quantizer,
    stats: SiteStats | None = None,
) -> int:
    """Replace each MatMul/Gemm use of ``site`` by ``com.microsoft.MatMulNBits``; return stored bytes."""
    w = Writer(site, config, used_names, on_done, quantizer, stats)
    shapes = matmulnbits_shapes(site.k, site.n, config)
    attributes = matmulnbits_attributes(site, config)
    return _write_nbits_nodes(w, pack_for_matmulnbits(config), shapes, "MatMulNBits", MS_DOMAIN, attributes)


def matmulnbits_attributes(site: WeightSite, config: QuantConfig) -> dict[str, int]:
    """``K``, ``N``, ``bits``, ``block_size`` (and ``accuracy_level`` when set) of MatMulNBits."""
    block = config.granularity.k_block
    assert block is not None
    attributes = {"K": site.k, "N": site.n, "bits": config.bits, "block_size": block}
    if config.accuracy_level is not None:
        attributes["accuracy_level"] = config.accuracy_level
    return attributes


def check_matmulnbits(node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
    """A ``com.microsoft.MatMulNBits`` node's attributes agree with its constant inputs' shapes.

    ``dims``: shapes of the initializers in scope. ONNX Runtime checks this only when it
    prepacks the weights (after loading them all); inspect and convert check it up front.
    """
    label = f"MatMulNBits node {node.name or '(unnamed)'!r}"
    k = _int_attribute(node, "K", None, label)
    n = _int_attribute(node, "N", None, label)
    bits = _int_attribute(node, "bits", 4, label)
    block = _int_attribute(node, "block_size", None, label)
    if k < 1 or n < 1:
        raise OxQuantError(f"{label}: K={k} and N={n} must be positive")
    if not 2 <= bits <= 8:
        raise OxQuantError(f"{label}: bits={bits} is not between 2 and 8")
    if not valid_block_size(block):
        raise OxQuantError(f"{label}: block_size={block} is not a power of two >= {MIN_BLOCK_SIZE}")
    blocks = math.ceil(k / block)
    blob = block * bits // 8
    zp_bytes = math.ceil(blocks * bits / 8)
    allowed: dict[int, list[tuple[int, ...]]] = {  # input index -> the shapes ONNX Runtime accepts (B exactly; scales flat or 2-D)
        1: [(n, blocks, blob)],
        2: [(n * blocks,), (n, blocks)],
        3: [(n * zp_bytes,), (n, zp_bytes), (n * blocks,), (n, blocks)],
    }
    for index, shapes in allowed.items():
        name = node.input[index] if len(node.input) > index else ""
        if name in dims and dims[name] not in shapes:
            raise OxQuantError(
                f"{label}: input {name!r} has shape {list(dims[name])}, but K={k}, N={n}, bits={bits}, "
                f"block_size={block} need {' or '.join(str(list(s)) for s in shapes)}"
            )


def describe_nbits(node: ir.Node, fmt: str) -> QuantizedTensorInfo | None:
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


def dequantize_node(node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
    """``W[K, N]`` of a MatMulNBits node whose B, scales and zero points are initializers."""
    b_name = node.input[1]
    inputs = [name for name in node.input[1:4] if name]
    if not all(name in tensors for name in inputs):
        return "B, scales or zero points are not initializers"
    if len(node.input) > 4 and node.input[4]:
        return "MatMulNBits with g_idx is not supported"
    bits = int(_attr(node, "bits", 4))
    zero_points = tensors.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    values = dequantize_matmulnbits(
        tensors.array(b_name),
        tensors.array(node.input[2]),
        zero_points,
        k=int(_attr(node, "K", 0)),
        n=int(_attr(node, "N", 0)),
        bits=bits,
        block_size=int(_attr(node, "block_size", 0)),
    )
    return Dequantized(b_name, bits, values, "kn")


class MatMulNBitsFormat:
    """The registry entry of ``com.microsoft.MatMulNBits`` (see ``ox_quant.formats.base``)."""

    name = "matmulnbits"
    domain = MS_DOMAIN
    op_type = "MatMulNBits"
    opset = 1
    min_ir_version = 0
    code_input = 1

    def handles(self, domain: str, op_type: str) -> bool:
        return domain == self.domain and op_type == self.op_type

    def rejects(self, config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
        return matmulnbits_rejects(config, k, n, dtype)

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
        return write_matmulnbits(site, config, used_names, on_done, quantizer=quantizer, stats=stats)

    def describe(self, node: ir.Node) -> QuantizedTensorInfo | None:
        return describe_nbits(node, self.name)

    def check(self, node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
        check_matmulnbits(node, dims)

    def dequantize(self, node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
        return dequantize_node(node, tensors)


MATMULNBITS = MatMulNBitsFormat()
