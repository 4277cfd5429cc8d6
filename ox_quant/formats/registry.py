"""The formats ox-quant writes and reads, one module each (``ox_quant.formats.base.QuantFormat``).

Adding a format: one module implementing the protocol, and one entry in :data:`FORMATS`.
convert (writing, opsets, IR version), inspect (describe), load (check), verify --per-layer
(dequantize) and the study's scale bytes loop over this tuple.
"""

from __future__ import annotations

import onnx

from ox_quant.formats.base import QuantFormat
from ox_quant.formats.custom_matmul import CUSTOM
from ox_quant.formats.gather_block_quantized import GATHER_BLOCK_QUANTIZED
from ox_quant.formats.matmulnbits import MATMULNBITS
from ox_quant.formats.qdq import QDQ
from ox_quant.ir.validate import graphs

FORMATS: tuple[QuantFormat, ...] = (MATMULNBITS, QDQ, GATHER_BLOCK_QUANTIZED, CUSTOM)


def format_named(name: str) -> QuantFormat:
    """The format called ``name`` (``FormatChoice.format``); KeyError for an unknown name."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def format_of(domain: str, op_type: str) -> QuantFormat | None:
    """The format a node of this domain and op type belongs to, or None."""
    for fmt in FORMATS:
        if fmt.handles(domain, op_type):
            return fmt
    return None


def check_quantized_nodes(proto: onnx.ModelProto) -> None:
    """Quantized nodes of every registered format are self-consistent (each format's ``check``).

    Run when a model is loaded (``ox_quant.pipeline.load``), after ``ox_quant.ir.validate``.
    """
    for graph in graphs(proto.graph):
        dims = {t.name: tuple(t.dims) for t in graph.initializer}
        for node in graph.node:
            fmt = format_of(node.domain, node.op_type)
            if fmt is not None:
                fmt.check(node, dims)
