"""Finding the weights a model offers for quantization ("sites"), and why others are skipped.

A site is one constant initializer and *all* of its uses. Each use says how the weight is
read, which fixes the weight's normalised form ``W[K, N]`` (K = reduction axis):

==================================  ==========  =====================================
use                                  layout      ``W[K, N]`` from the stored tensor S
==================================  ==========  =====================================
``MatMul(A, S)``                     ``KN``      ``S``
``Gemm(A, S)``, transB=0             ``KN``      ``S``
``Gemm(A, S)``, transB=1             ``NK``      ``S.T``
``Gather(S, ids)``, axis=0           ``NK``      ``S.T`` (one row per token, K = embedding dim)
``MatMul(A, Transpose(S))``          ``NK``      ``S.T`` (tied output projection)
``Conv(X, S)``                       ``NK``      ``S.reshape(Cout, -1).T``
==================================  ==========  =====================================

All uses of a weight must agree on the layout; the weight is then quantized once and
every use reads the same stored tensors. Matching reads names, shapes and dtypes only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

SUPPORTED_DTYPES = {ir.DataType.FLOAT: "FLOAT", ir.DataType.FLOAT16: "FLOAT16", ir.DataType.BFLOAT16: "BFLOAT16"}
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Gather", "Conv")

UseKind = Literal["matmul", "gemm", "gather", "transpose_matmul", "conv"]
Layout = Literal["KN", "NK"]


@dataclass(frozen=True)
class Skip:
    """A weight (or node) left as it is, with the reason."""

    name: str
    reason: str


@dataclass(frozen=True)
class Use:
    """One way a node reads the weight: ``node.inputs[index]`` is the weight."""

    node: ir.Node
    index: int
    kind: UseKind

    @property
    def op(self) -> str:
        return "MatMul" if self.kind == "transpose_matmul" else self.node.op_type


@dataclass
class WeightSite:
    """A constant weight, its normalised shape ``[K, N]`` and all of its uses."""

    name: str
    value: ir.Value
    graph: ir.Graph
    stored_shape: tuple[int, ...]
    layout: Layout
    k: int
    n: int
    dtype: str
    uses: list[Use] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.k * self.n

    @property
    def kinds(self) -> set[str]:
        return {u.kind for u in self.uses}

    @property
    def op(self) -> str:
        """Display name of the consumers, e.g. ``MatMul`` or ``Gather+MatMul`` (tied)."""
        ops: list[str] = []
        for use in self.uses:
            if use.op not in ops:
                ops.append(use.op)
        return "+".join(ops)

    def normalise(self, stored: np.ndarray) -> np.ndarray:
        """The stored array as ``W[K, N]`` (a view when the layout allows)."""
        if self.layout == "KN":
            return stored.reshape(self.k, self.n)
        return stored.reshape(self.n, self.k).T


def _static_dims(value: ir.Value) -> tuple[int, ...] | None:
    shape: ir.ShapeProtocol | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    dims = tuple(shape)
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def classify_use(node: ir.Node, index: int, dims: tuple[int, ...]) -> tuple[UseKind, Layout] | str:
    """How ``node`` reads a weight of shape ``dims`` at input ``index``, or why it can't be quantized."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"used by {node.domain}.{op}"
    if op == "MatMul" and index == 1:
        return ("matmul", "KN") if len(dims) == 2 else f"MatMul weight has rank {len(dims)}, not 2"
    if op == "Gemm" and index == 1:
        return ("gemm", "NK" if _int_attr(node, "transB", 0) else "KN")
    if op == "Gather" and index == 0:
        if len(dims) != 2:
            return f"Gather table has rank {len(dims)}, not 2"
        if _int_attr(node, "axis", 0) != 0:
            return "Gather reads along axis 1"
        return ("gather", "NK")
    if op == "Transpose" and index == 0 and len(dims) == 2:
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            return "Transpose with an unexpected perm"
        out = node.outputs[0]
        if out.is_graph_output():
            return "transposed weight is a graph output"
        if not out.uses() or any(u.node.op_type != "MatMul" or u.idx != 1 for u in out.uses()):
            return "transposed weight feeds something other than a MatMul weight"
        return ("transpose_matmul", "NK")
    if op == "Conv" and index == 1:
        return ("conv", "NK") if len(dims) >= 3 else "Conv weight has rank < 3"
    where = "input" if op != "Gather" else "indices"
    return f"used as {where} {index} of {op}"


def _use_op(node: ir.Node, kind: str) -> str:
    return "MatMul" if kind == "transpose_matmul" else node.op_type


def find_sites(model: ir.Model, include_ops: tuple[str, ...] = QUANTIZABLE_OPS) -> tuple[list[WeightSite], list[Skip]]:
    """Every quantizable constant weight in every graph (subgraphs included), and skips.

    A weight is skipped (with the reason) when it is not float, has a dynamic shape, is a
    graph input or output, or has a use that cannot read a quantized weight.
    ``include_ops``: the consumer op types considered (others are skipped with a reason).
    """
    sites: list[WeightSite] = []
    skips: list[Skip] = []
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            uses = list(value.uses())
            if not uses or value.const_value is None:
                continue
            consumer_ops = {u.node.op_type for u in uses}
            if not consumer_ops & {"MatMul", "Gemm", "Gather", "Conv", "Transpose"}:
                continue  # biases, norms, shapes: not weights of a quantizable op
            result = _site_for(name, value, graph, uses, include_ops)
            if isinstance(result, Skip):
                skips.append(result)
            else:
                sites.append(result)
    return sites, skips


def _site_for(
    name: str, value: ir.Value, graph: ir.Graph, uses: list, include_ops: tuple[str, ...]
) -> WeightSite | Skip:
    if value.is_graph_input():
        return Skip(name, "weight is also a graph input (can be overridden at run time)")
    if value.is_graph_output():
        return Skip(name, "weight is also a graph output")
    if value.dtype not in SUPPORTED_DTYPES:
        return Skip(name, f"weight dtype {value.dtype} is not a float type")
    dims = _static_dims(value)
    if dims is None:
        return Skip(name, "weight has no static shape")
    layouts: set[Layout] = set()
    site_uses: list[Use] = []
    for usage in uses:
        classified = classify_use(usage.node, usage.idx, dims)
        if isinstance(classified, str):
            return Skip(name, classified)
        kind, layout = classified
        op = _use_op(usage.node, kind)
        if op not in include_ops:
            return Skip(name, f"{op} weights are not selected (--include-op/--exclude-op)")
        layouts.add(layout)
        site_uses.append(Use(usage.node, usage.idx, kind))
    if len(layouts) != 1:
        return Skip(name, "its uses read it along different reduction axes")
    kinds = {u.kind for u in site_uses}
    if "conv" in kinds and kinds != {"conv"}:
        return Skip(name, "used by Conv and by another op")
    layout = layouts.pop()
    if "conv" in kinds:
        n, k = dims[0], math.prod(dims[1:])
    elif len(dims) != 2:
        return Skip(name, f"weight has rank {len(dims)}, only rank-2 weights of {'/'.join(sorted(kinds))} are quantized")
    elif layout == "KN":
        k, n = dims
    else:
        n, k = dims
    if k * n == 0:
        return Skip(name, "weight is empty")
    return WeightSite(name, value, graph, dims, layout, k, n, SUPPORTED_DTYPES[value.dtype], site_uses)


def name_matches(patterns: list[re.Pattern[str]], site: WeightSite) -> str | None:
    """The first pattern that matches the weight's name or one of its nodes' names."""
    for pattern in patterns:
        if pattern.search(site.name):
            return pattern.pattern
        for use in site.uses:
            if use.node.name and pattern.search(use.node.name):
                return pattern.pattern
    return None
