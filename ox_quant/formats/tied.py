"""Tied embedding tables: one packed tensor read by GatherBlockQuantized and MatMulNBits.

A table ``T[V, D]`` read by ``Gather(T, ids)`` and by the output projection
(``MatMul(h, Transpose(T))`` or ``Gemm(h, T, transB=1)``) is ``W = T.T`` with K = D,
N = V. MatMulNBits stores it as ``B: uint8[V, nb, blob]`` (``nb = ceil(D/bs)``,
``blob = bs*bits/8``), each row of ``T`` packed along D, and ``scales: [V*nb]``. These
are the bytes of GatherBlockQuantized's table when it is read as 3-D: data
``[V, nb, blob]`` with ``quantize_axis=2`` and ``block_size=bs`` (one block per row of
the last axis) and scales ``[V, nb, 1]``. So the file stores the codes and scales once:

* ``MatMulNBits(h, B, scales[, zp])`` for each projection (``zp: uint8[V*ceil(nb*bits/8)]``);
* ``GatherBlockQuantized(B, ids, Reshape(scales, [V, nb, 1])[, zp_g])`` for each lookup,
  giving ``ids.shape + [nb, bs]``, reshaped to ``ids.shape + [nb*bs]`` and sliced to D
  when D is not a multiple of bs. The asymmetric form stores a second, small copy of the
  zero points, ``zp_g: uint8[V, nb, 1]`` (one per byte), because MatMulNBits packs
  ``8/bits`` blocks' zero points per byte and GatherBlockQuantized reads one per row of
  its last axis.

ONNX Runtime (1.31, CPU) rejects the alternatives: MatMulNBits wants B exactly
``[N, nb, blob]`` and scales ``[N*nb]`` or ``[N, nb]``; GatherBlockQuantized wants scales
of data's rank. Both kernels then read the same codes and scales, so the lookup and the
projection use identical quantized values.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import Format, QuantConfig
from ox_quant.core.packing import pack_bitstream
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.formats.choice import TIED_FORMAT, FormatChoice, choose_qdq_only, matmulnbits_rejects
from ox_quant.formats.matmulnbits import matmulnbits_attributes, matmulnbits_shapes, pack_for_matmulnbits
from ox_quant.formats.writers import ProgressHook, Writer, _initializer, replace_nbits_uses
from ox_quant.ir.names import fresh_name
from ox_quant.ir.sites import Skip, WeightSite
from ox_quant.ir.validate import MS_DOMAIN

#: The registered formats whose nodes a tied table is written as.
TIED_FORMATS = ("matmulnbits", "gather_block_quantized")
TIED_REASON = "tied table: GatherBlockQuantized and MatMulNBits read one packed tensor"


def tied_rejects(site: WeightSite, config: QuantConfig) -> str | None:
    """Why the shared layout cannot hold this tied table (None when it can)."""
    rejected = matmulnbits_rejects(config, site.k, site.n, site.dtype)
    return rejected.replace("MatMulNBits", "MatMulNBits/GatherBlockQuantized", 1) if rejected else None


def plan_tied(site: WeightSite, config: QuantConfig) -> tuple[QuantConfig, FormatChoice] | Skip:
    """Format of a table read by Gather and by a projection: the shared layout when it fits."""
    rejected = tied_rejects(site, config)
    if config.format in (Format.AUTO, Format.MATMULNBITS) and rejected is None:
        return config, FormatChoice(TIED_FORMAT, TIED_REASON)
    if config.format is Format.MATMULNBITS:
        return Skip(site.name, f"--format matmulnbits: {rejected}")
    why = rejected if config.format is Format.AUTO else f"--format {config.format.value}"
    return config, choose_qdq_only(config, f"tied weight ({why}): one DequantizeLinear serves the Gather and the MatMul")


def _constant(w: Writer, array: np.ndarray, suffix: str) -> ir.Value:
    """A small int64 shape/index constant (graph plumbing, not counted as weight bytes)."""
    return _initializer(w.graph, ir.Tensor(array, name=w.name(suffix)))


def _node(w: Writer, op: str, inputs: list[ir.Value | None], suffix: str, **attributes: object) -> ir.Node:
    domain = MS_DOMAIN if op == "GatherBlockQuantized" else ""
    node = ir.node(op, inputs, attributes, domain=domain, name=w.name(suffix))  # type: ignore[arg-type]
    node.outputs[0].name = fresh_name(w.used_names, f"{node.name}_out")
    return node


def write_tied(
    site: WeightSite,
    config: QuantConfig,
    used_names: set[str],
    on_done: ProgressHook | None,
    *,
    quantizer: Quantizer,
    stats: SiteStats | None = None,
) -> int:
    """Rewrite every use of a tied table to read one packed tensor; return stored bytes."""
    bs = config.granularity.k_block
    assert bs is not None
    v, d = site.n, site.k
    nb = math.ceil(d / bs)
    base = pack_for_matmulnbits(config)

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        out = base(q)
        if not q.symmetric:  # [nb, V] -> one zero point per byte, [V, nb, 1]
            out["gather_zero_points"] = pack_bitstream(np.ascontiguousarray(q.zero_points.T)[..., None], q.bits)
        return out

    w = Writer(site, config, used_names, on_done, quantizer, stats)
    lazy = w.lazy(packer)
    shapes = matmulnbits_shapes(d, v, config)
    inputs = {"B": w.add(lazy, "B", ir.DataType.UINT8, shapes["B"], "_Q")}
    inputs["scales"] = w.add(lazy, "scales", w.scale_dtype, shapes["scales"], "_scales")
    gather_zp = None
    if not config.symmetric:
        inputs["zero_points"] = w.add(lazy, "zero_points", ir.DataType.UINT8, shapes["zero_points"], "_zp")
        gather_zp = w.add(lazy, "gather_zero_points", ir.DataType.UINT8, (v, nb, 1), "_gather_zp")

    gathers = [use.node for use in site.uses if use.kind == "gather"]
    replace_nbits_uses(w, inputs, "MatMulNBits", MS_DOMAIN, matmulnbits_attributes(site, config))
    scales_3d = _node(w, "Reshape", [inputs["scales"], _constant(w, np.array([v, nb, 1], np.int64), "_scales_shape")],
                      "_scales_3d")
    w.graph.insert_before(w.graph.node(0), scales_3d)
    width = _constant(w, np.array([nb * bs], np.int64), "_row_width")
    attributes = {"block_size": bs, "gather_axis": 0, "quantize_axis": 2, "bits": config.bits}
    for gather in gathers:
        ids = gather.inputs[1]
        lookup_inputs = [inputs["B"], ids, scales_3d.outputs[0]] + ([gather_zp] if gather_zp is not None else [])
        lookup = _node(w, "GatherBlockQuantized", lookup_inputs, "_GatherBlockQuantized", **attributes)
        ids_shape = _node(w, "Shape", [ids], "_ids_shape")
        row_shape = _node(w, "Concat", [ids_shape.outputs[0], width], "_rows_shape", axis=0)
        rows = _node(w, "Reshape", [lookup.outputs[0], row_shape.outputs[0]], "_rows")
        nodes = [lookup, ids_shape, row_shape, rows]
        if nb * bs != d:  # the last block is padded: keep the first D values
            starts, ends, axes = (_constant(w, np.array([x], np.int64), s) for x, s in ((0, "_start"), (d, "_end"), (-1, "_axis")))
            nodes.append(_node(w, "Slice", [rows.outputs[0], starts, ends, axes], "_rows_d"))
        graph = gather.graph or w.graph
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], nodes, gather.outputs, nodes[-1].outputs)
    return w.finish()
