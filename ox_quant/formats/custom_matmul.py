"""The format of ox-quant's own op ``ox_quant.MatMulNBits`` (kernels in ``custom_ops/``):
its constants, building its inputs, its numpy dequantizer and the int8 rounding of its
accuracy-level-4 path.

The op (domain ``ox_quant``, opset 1) has com.microsoft.MatMulNBits' inputs and attributes,
for any ``bits`` in 2..8 and any ``block_size``, plus the attribute ``channel_group_size`` G
(scales and zero points shared by G consecutive output channels)::

    W[k, n] = (q[k, n] - zp[k // block_size, n // G]) * scale[k // block_size, n // G]
    Y = A @ W (+ bias)

Attribute ``accuracy_level`` (int, 0..4, default 0): 4 quantizes each row of A to int8 per
block of ``block_size`` along K (symmetric, scale = max|a| / 127, round half to even) and
computes the block dot products in integers on the CPU when M (rows of A) <= ``INT8_MAX_ROWS``
(faster, ~1e-3 relative error, see :func:`quantize_activations_int8`); larger M, levels 0..3
and the CUDA kernels compute in float32. Running it needs the library
(``ox_quant.runtime.custom_ops``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.packing import pack_matmulnbits, pack_zero_points, unpack_matmulnbits, unpack_zero_points
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.errors import OxQuantError
from ox_quant.formats.base import Dequantized, QuantizedTensorInfo, TensorSource
from ox_quant.formats.base import int_attribute as _int_attribute
from ox_quant.formats.base import proto_attr as _attr
from ox_quant.formats.matmulnbits import FLOAT_DTYPES, describe_nbits
from ox_quant.formats.writers import SCALE_DTYPES, ProgressHook, Writer, _write_nbits_nodes
from ox_quant.ir.sites import WeightSite

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
INT8_ACCURACY_LEVEL = 4
INT8_MAX_ROWS = 8  # accuracy_level 4 quantizes A when M <= 8; larger M run the float path (faster there)
DOMAIN = "ox_quant"
OP_TYPE = "MatMulNBits"
OPSET_VERSION = 1


@dataclass(frozen=True)
class CustomMatMulWeights:
    """Constant inputs and attributes of one ``ox_quant.MatMulNBits`` node.

    ``B``: uint8[N, n_blocks, blob] (blob = ceil(block_size*bits/8)); ``scales``:
    [ceil(N/G) * n_blocks] in the activation dtype, index ``g * n_blocks + b``;
    ``zero_points``: uint8[ceil(N/G) * ceil(n_blocks*bits/8)] or None (then 2**(bits-1)).
    """

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    attributes: dict[str, int] = field(default_factory=dict)

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """``{"B", "scales"[, "zero_points"]}``: the node's inputs 1, 2 (and 3), in order."""
        out = {"B": self.B, "scales": self.scales}
        if self.zero_points is not None:
            out["zero_points"] = self.zero_points
        return out

    @property
    def nbytes(self) -> int:
        """Stored bytes (packed codes + scales + zero points), for bits-per-weight."""
        return sum(int(a.nbytes) for a in self.inputs.values())


def _grid(values: np.ndarray, n_blocks: int, n_groups: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size != n_blocks * n_groups:
        raise OxQuantError(
            f"{what} has {arr.size} values, expected n_blocks*n_groups = {n_blocks}*{n_groups} (shape [n_blocks, n_groups])"
        )
    return arr.reshape(n_blocks, n_groups)


def custom_matmul_initializers(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    channel_group_size: int = 1,
    dtype: np.dtype | type = np.float32,
    accuracy_level: int | None = None,
) -> CustomMatMulWeights:
    """Inputs and attributes of ``ox_quant.MatMulNBits`` for ``W = (codes - zp) * scales``.

    ``codes``: unsigned integers uint8[K, N] in [0, 2**bits). ``scales`` and ``zero_points``:
    [n_blocks, n_groups] with n_blocks = ceil(K / block_size) and n_groups = ceil(N / G)
    (any shape with that many values in that order: [n_groups] when n_blocks = 1, a scalar for
    per-tensor). ``zero_points=None`` means the symmetric 2**(bits-1).
    Granularities: block B -> (block_size=B, G=1); per-channel -> (K, 1);
    channel-group G -> (K, G); per-tensor -> (K, N).
    ``accuracy_level``: None leaves the attribute out (the op's default 0, float32); 0..4 writes
    it (4 = int8 activations on the CPU).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise OxQuantError(f"codes must be [K, N], got shape {codes.shape}")
    if not 2 <= bits <= 8:
        raise OxQuantError(f"ox_quant.MatMulNBits takes 2..8 bits, got {bits}")
    k, n = codes.shape
    if block_size < 1 or channel_group_size < 1:
        raise OxQuantError("block_size and channel_group_size must be >= 1")
    _check_accuracy_level(accuracy_level)
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise OxQuantError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    n_blocks = math.ceil(k / block_size)
    n_groups = math.ceil(n / channel_group_size)
    scale_grid = _grid(scales, n_blocks, n_groups, "scales")
    packed = pack_matmulnbits(codes.astype(np.uint8), bits, block_size)
    op_scales = np.ascontiguousarray(scale_grid.T.reshape(-1)).astype(dtype)
    op_zp = None
    if zero_points is not None:
        zp_grid = _grid(zero_points, n_blocks, n_groups, "zero_points")
        if zp_grid.min() < 0 or zp_grid.max() >= 2**bits:
            raise OxQuantError(f"zero points must lie in [0, {2**bits - 1}] for {bits} bits")
        op_zp = pack_zero_points(zp_grid.astype(np.uint8), bits)
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if channel_group_size != 1:
        attributes["channel_group_size"] = channel_group_size
    if accuracy_level is not None:
        attributes["accuracy_level"] = int(accuracy_level)
    return CustomMatMulWeights(B=packed, scales=op_scales, zero_points=op_zp, attributes=attributes)


def _check_accuracy_level(level: int | None) -> None:
    if level is not None and (isinstance(level, bool) or int(level) != level or int(level) not in ACCURACY_LEVELS):
        raise OxQuantError(f"accuracy_level must be one of {ACCURACY_LEVELS} (4 = int8 activations), got {level!r}")


def quantize_activations_int8(a: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``accuracy_level=4`` does to A: ``(qa, scale)`` with int8 codes ``qa`` [..., K] and
    float32 ``scale`` [..., ceil(K/block_size)], so that the op multiplies by
    ``qa * scale[..., k // block_size]`` instead of A (then exact integer block dot products,
    float32 accumulation across blocks).

    Per row and block: ``amax = max|a|`` (float32), ``scale = amax / 127``,
    ``qa = clip(rint(a * (127 / amax)), -127, 127)`` (float32 arithmetic, round half to even;
    0 when amax = 0). float16 A is widened to float32 first.
    """
    a32 = np.asarray(a).astype(np.float32)
    k = a32.shape[-1]
    nb = math.ceil(k / block_size) if k else 0
    qa = np.zeros(a32.shape, np.int8)
    scale = np.zeros((*a32.shape[:-1], nb), np.float32)
    for b in range(nb):
        blk = a32[..., b * block_size:(b + 1) * block_size]
        amax = np.abs(blk).max(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
        inv = inv.astype(np.float32)
        qa[..., b * block_size:(b + 1) * block_size] = np.clip(np.rint(blk * inv), -127, 127).astype(np.int8)
        scale[..., b] = (amax / np.float32(127)).astype(np.float32)[..., 0]
    return qa, scale


def dequantize_custom_matmul(weights: CustomMatMulWeights) -> np.ndarray:
    """The float64 weight ``W[K, N]`` that a node with these inputs multiplies by (reference)."""
    attrs = weights.attributes
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    g = attrs.get("channel_group_size", 1)
    n_blocks, n_groups = math.ceil(k / bs), math.ceil(n / g)
    codes = unpack_matmulnbits(np.asarray(weights.B).reshape(n, n_blocks, -1), bits, bs, k).astype(np.float64)
    scales = np.asarray(weights.scales, dtype=np.float64).reshape(n_groups, n_blocks).T
    if weights.zero_points is None:
        zps = np.full((n_blocks, n_groups), 2 ** (bits - 1), dtype=np.float64)
    else:
        zps = unpack_zero_points(weights.zero_points, bits, n_blocks, n_groups).astype(np.float64)
    rows = np.arange(k) // bs
    cols = np.arange(n) // g
    return (codes - zps[rows][:, cols]) * scales[rows][:, cols]


def make_custom_matmul_node(
    a: str,
    y: str,
    weight_names: dict[str, str],
    attributes: dict[str, int],
    bias: str | None = None,
    name: str | None = None,
    accuracy_level: int | None = None,
):
    """An ``onnx.NodeProto`` for ``ox_quant.MatMulNBits`` with inputs
    (a, B, scales, zero_points or "", "" (g_idx), bias); ``weight_names`` maps the keys of
    :attr:`CustomMatMulWeights.inputs` to initializer names. ``accuracy_level`` (0..4), when
    given, sets or replaces that attribute."""
    from onnx import helper

    _check_accuracy_level(attributes.get("accuracy_level"))
    _check_accuracy_level(accuracy_level)
    if accuracy_level is not None:
        attributes = {**attributes, "accuracy_level": int(accuracy_level)}

    inputs = [a, weight_names["B"], weight_names["scales"], weight_names.get("zero_points", "")]
    if bias:
        inputs += ["", bias]
    while inputs and not inputs[-1]:
        inputs.pop()
    node_attributes: dict[str, Any] = attributes  # make_node's **kwargs are the node's attributes
    return helper.make_node(OP_TYPE, inputs, [y], domain=DOMAIN, name=name or "", **node_attributes)


# ----------------------------------------------------------------------------------
# The format: which configs, writing, checking, reading back


def custom_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why ox-quant's own ``ox_quant.MatMulNBits`` cannot hold this config (None when it can).

    It takes any bits 2..8 and every granularity: block B, per-channel (one block of K),
    channel-group G (one block of K, G channels per scale), per-tensor (K and N).
    """
    if dtype not in FLOAT_DTYPES:
        return f"ox_quant.MatMulNBits takes float32/float16 activations, not {dtype.lower()}"
    return None


def custom_block_and_group(config: QuantConfig, k: int, n: int) -> tuple[int, int]:
    """``(block_size, channel_group_size)`` of ``ox_quant.MatMulNBits`` for a granularity."""
    return config.granularity.block_shape(k, n)


def custom_shapes(k: int, n: int, config: QuantConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Input shapes and attributes of ``ox_quant.MatMulNBits`` for a ``[K, N]`` weight."""
    block, group = custom_block_and_group(config, k, n)
    nb, ng = math.ceil(k / block), math.ceil(n / group)
    shapes = {"B": (n, nb, math.ceil(block * config.bits / 8)), "scales": (ng * nb,)}
    if not config.symmetric:
        shapes["zero_points"] = (ng * math.ceil(nb * config.bits / 8),)
    attributes = {"K": k, "N": n, "bits": config.bits, "block_size": block}
    if group != 1:
        attributes["channel_group_size"] = group
    if config.accuracy_level is not None:
        attributes["accuracy_level"] = config.accuracy_level
    return shapes, attributes


def write_custom(
    site: WeightSite,
    config: QuantConfig,
    used_names: set[str],
    on_done: ProgressHook | None,
    *,
    quantizer: Quantizer,
    stats: SiteStats | None = None,
) -> int:
    """Replace each MatMul/Gemm use of ``site`` by ``ox_quant.MatMulNBits`` (custom-op library)."""
    block, group = custom_block_and_group(config, site.k, site.n)
    scale_np, _ = SCALE_DTYPES[site.dtype]

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        zps = None if q.symmetric else q.zero_points
        return custom_matmul_initializers(q.codes, q.scales, zps, q.bits, block, group, dtype=scale_np).inputs

    shapes, attributes = custom_shapes(site.k, site.n, config)
    return _write_nbits_nodes(Writer(site, config, used_names, on_done, quantizer, stats), packer, shapes, OP_TYPE, DOMAIN, attributes)


def check_custom_node(node: onnx.NodeProto) -> None:
    """An ``ox_quant`` custom node has the integer attributes its description relies on."""
    label = f"{node.op_type} node {node.name or '(unnamed)'!r} (domain {DOMAIN})"
    k = _int_attribute(node, "K", None, label)
    n = _int_attribute(node, "N", None, label)
    bits = _int_attribute(node, "bits", 4, label)
    block = _int_attribute(node, "block_size", None, label)
    group = _int_attribute(node, "channel_group_size", 1, label)
    if min(k, n, block, group) < 1:
        raise OxQuantError(f"{label}: K, N, block_size and channel_group_size must be positive")
    if not 2 <= bits <= 8:
        raise OxQuantError(f"{label}: bits={bits} is not between 2 and 8")


def dequantize_node(node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
    """``W[K, N]`` of an ``ox_quant.MatMulNBits`` node on initializers (float32)."""
    b_name = node.input[1]
    inputs = [name for name in node.input[1:4] if name]
    if not all(name in tensors for name in inputs):
        return "B, scales or zero points are not initializers"
    if len(node.input) > 4 and node.input[4]:
        return "ox_quant.MatMulNBits with g_idx is not supported"
    keys = ("K", "N", "bits", "block_size", "channel_group_size")
    attributes = {key: int(_attr(node, key, {"bits": 4, "channel_group_size": 1}.get(key, 0))) for key in keys}
    zero_points = tensors.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    scales = tensors.array(node.input[2])
    weights = CustomMatMulWeights(tensors.array(b_name), scales, zero_points, attributes)
    values = dequantize_custom_matmul(weights).astype(np.float32)
    return Dequantized(b_name, attributes["bits"], values, "kn")


class CustomMatMulFormat:
    """The registry entry of ``ox_quant.MatMulNBits`` (see ``ox_quant.formats.base``)."""

    name = "custom"
    domain = DOMAIN
    op_type = OP_TYPE
    opset = OPSET_VERSION
    min_ir_version = 0
    code_input = 1

    def handles(self, domain: str, op_type: str) -> bool:
        return domain == self.domain  # every op of ox-quant's domain has MatMulNBits' inputs

    def rejects(self, config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
        return custom_rejects(config, k, n, dtype)

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
        return write_custom(site, config, used_names, on_done, quantizer=quantizer, stats=stats)

    def describe(self, node: ir.Node) -> QuantizedTensorInfo | None:
        return describe_nbits(node, self.name)

    def check(self, node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> None:
        check_custom_node(node)

    def dequantize(self, node: onnx.NodeProto, tensors: TensorSource) -> Dequantized | str | None:
        return dequantize_node(node, tensors)


CUSTOM = CustomMatMulFormat()
