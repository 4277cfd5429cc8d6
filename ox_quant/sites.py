"""Finding the weights a model offers for quantization ("sites"), and why others are skipped.

Matching reads names, shapes and dtypes only; no weight data is touched. A weight used by
several nodes is one site with several consumers, so it is quantized (and stored) once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import onnx_ir as ir

SUPPORTED_DTYPES = {ir.DataType.FLOAT: "FLOAT", ir.DataType.FLOAT16: "FLOAT16"}


@dataclass(frozen=True)
class Skip:
    """A weight (or node) left as it is, with the reason."""

    name: str
    reason: str


@dataclass
class WeightSite:
    """A constant weight ``W[K, N]`` and the nodes that multiply by it.

    ``value`` is the initializer; ``consumers`` are ``(node, input_index)`` pairs.
    """

    name: str
    value: ir.Value
    op: str
    k: int
    n: int
    dtype: str
    consumers: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.k * self.n


def _dims(value: ir.Value) -> tuple[int, ...] | None:
    shape = value.shape if value.shape is not None else (value.const_value.shape if value.const_value else None)
    if shape is None:
        return None
    dims = tuple(shape)
    if not all(isinstance(d, int) for d in dims):
        return None
    return dims  # type: ignore[return-value]


def match_matmul_weight(node: ir.Node) -> tuple[ir.Value, int, int] | str:
    """``(weight, K, N)`` if ``node`` is a MatMul by a rank-2 constant initializer, else why not."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "MatMul":
        return f"{node.op_type} is not a MatMul"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "MatMul has no second input"
    weight = node.inputs[1]
    if not weight.is_initializer() or weight.const_value is None:
        return "weight is computed at run time, not a constant initializer"
    if weight.is_graph_input():
        return "weight is also a graph input (can be overridden at run time)"
    dims = _dims(weight)
    if dims is None:
        return "weight has no static shape"
    if len(dims) != 2:
        return f"weight has rank {len(dims)}, only rank-2 MatMul weights are quantized"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {weight.dtype} is not float32 or float16"
    return weight, dims[0], dims[1]


def find_sites(
    graph: ir.Graph,
    exclude: Iterable[str] = (),
) -> tuple[list[WeightSite], list[Skip]]:
    """All MatMul weight sites of ``graph`` (top level), and skips with reasons.

    ``exclude``: regular expressions matched (``re.search``) against weight and node names.
    A weight with any consumer that is not a quantizable MatMul use is skipped: quantizing
    it would store it twice.
    """
    patterns = [re.compile(p) for p in exclude]
    sites: dict[str, WeightSite] = {}
    skips: dict[str, Skip] = {}
    for node in graph:
        if node.op_type != "MatMul":
            continue
        matched = match_matmul_weight(node)
        if isinstance(matched, str):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            name = weight.name if weight is not None and weight.is_initializer() else (node.name or "MatMul")
            skips.setdefault(name, Skip(name, matched))
            continue
        weight, k, n = matched
        name = weight.name or ""
        hit = next((p.pattern for p in patterns if p.search(name) or (node.name and p.search(node.name))), None)
        if hit is not None:
            skips.setdefault(name, Skip(name, f"excluded by --exclude {hit!r}"))
            continue
        site = sites.get(name)
        if site is None:
            site = sites[name] = WeightSite(name, weight, "MatMul", k, n, SUPPORTED_DTYPES[weight.dtype])
        site.consumers.append((node, 1))
    result = []
    for name, site in sites.items():
        if name in skips:
            continue
        other = [u.node for u in site.value.uses() if (u.node, u.idx) not in site.consumers]
        if other:
            skips[name] = Skip(name, f"also used by {other[0].op_type} {other[0].name or ''}".rstrip())
            continue
        result.append(site)
    return result, list(skips.values())
