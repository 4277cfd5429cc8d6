"""Which activations multiply each weight site, and the levels of the site-dependency DAG.

Activation of a use (``ox_quant.ir.sites``), a tensor whose rows ``x[..., K]`` multiply ``W[K, N]``:

=====================================  ============================================
use                                    activation
=====================================  ============================================
``MatMul(A, W)``                       ``A`` (rows: every leading axis)
``Gemm(A, W)``                         ``A``, or ``A.T`` when ``transA=1``
``MatMul(A, Transpose(W))`` (tied)     ``A`` of each MatMul reading the Transpose
``Gather(W, ids)``, ``Conv(X, W)``     none: an embedding row is not a product;
                                       a Conv's rows would be im2col patches (not gathered)
=====================================  ============================================

Sites in subgraphs, or whose activation has no name, have no observable activation either.
Sites without one get no statistics (their quantizer is handed None).

Levels (:func:`site_levels`): a site's level is ``1 + max`` level of the calibrated sites
upstream of its activation(s) (0 upstream: level 1); sites without an observable
activation are level 0 (quantized first, needing no data). q, k and v projections reading
one input share a level. A tied table's Gather use adds nothing upstream (it is read float
until its own, last, level).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx_ir as ir

from ox_quant.ir.sites import WeightSite


@dataclass(frozen=True)
class Activation:
    """A tensor whose rows multiply a weight: ``name`` in the main graph; ``transposed``: rows
    are its columns (``Gemm`` ``transA=1``, a 2-D ``[K, M]`` input)."""

    name: str
    transposed: bool = False


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _consumers(site: WeightSite) -> list[ir.Node]:
    """The MatMul/Gemm nodes multiplying activations by the site's weight."""
    nodes: list[ir.Node] = []
    for use in site.uses:
        if use.kind in ("matmul", "gemm"):
            nodes.append(use.node)
        elif use.kind == "transpose_matmul":
            nodes.extend(u.node for u in use.node.outputs[0].uses())
    return nodes


def activations(site: WeightSite, model: ir.Model) -> tuple[Activation, ...]:
    """The site's activations (empty when none is observable; see the module docstring)."""
    if site.graph is not model.graph or "conv" in site.kinds:
        return ()
    found: list[Activation] = []
    for node in _consumers(site):
        a = node.inputs[0] if node.inputs else None
        if a is None or not a.name or a.const_value is not None:
            return ()
        transposed = node.op_type == "Gemm" and _int_attr(node, "transA", 0) == 1
        act = Activation(a.name, transposed)
        if act not in found:
            found.append(act)
    return tuple(found)


def site_levels(model: ir.Model, sites: Iterable[WeightSite]) -> dict[str, int]:
    """Level of every site (module docstring), computed on the main graph in node order."""
    sites = list(sites)
    acts = {s.name: activations(s, model) for s in sites}
    level = {s.name: (1 if acts[s.name] else 0) for s in sites}
    consumer_of: dict[int, list[str]] = {}  # id(node) -> calibrated sites it multiplies
    for s in sites:
        if acts[s.name]:
            for node in _consumers(s):
                consumer_of.setdefault(id(node), []).append(s.name)
    for _ in range(len(sites) + 1):  # a weight used at several depths may need another pass
        tensor_level: dict[int, int] = {}
        changed = False
        for node in model.graph:
            upstream = max((tensor_level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
            out = upstream
            for name in consumer_of.get(id(node), ()):
                want = 1 + tensor_level.get(id(node.inputs[0]), 0)
                if want > level[name]:
                    level[name] = want
                    changed = True
                out = max(out, level[name])
            for v in node.outputs:
                tensor_level[id(v)] = out
        if not changed:
            break
    return level
