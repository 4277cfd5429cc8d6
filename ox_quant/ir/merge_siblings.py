"""Merge sibling MatMulNBits nodes: weights that read the same input become one node.

A decoder block's q, k and v projections (and its gate and up projections) all read one
normalized activation. ONNX Runtime runs each MatMulNBits as a kernel of its own, each with
its own pass over the input (and, at accuracy level 4, its own int8 quantization of it).
Stacking the weights along N gives one kernel of ``N = N_1 + ... + N_m`` whose output is split
back (``Split`` on the last axis), or handed straight to a ``Concat`` that joined exactly those
outputs in that order. Codes, scales and zero points are the same bytes, rows concatenated:
for ``B [N_i, n_blocks, blob]``, ``scales [N_i * n_blocks]`` (or ``[N_i, n_blocks]``) and
``zero_points`` (packed per row), row-major concatenation along the first axis is the merged
weight, so output column ``j`` of the merged node is computed from the bytes column ``j`` of
its sibling used.

:func:`sibling_groups` says what merges (and :func:`why_not_siblings` why two nodes do not);
:func:`merge_group` builds the replacement; :func:`merge_siblings` runs both on a model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ox_quant.ir.names import fresh_name

DOMAIN = "com.microsoft"
#: Attributes that must agree for two MatMulNBits nodes to share one kernel.
SHARED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


@dataclass(frozen=True)
class MergedGroup:
    """One merge: the nodes it replaced (graph order), their N, and whether a Concat went too."""

    nodes: tuple[str, ...]
    n: tuple[int, ...]
    concat_removed: bool

    def as_dict(self) -> dict[str, object]:
        return {"nodes": list(self.nodes), "n": list(self.n), "concat_removed": self.concat_removed}


def _attribute(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def why_not_mergeable(node: ir.Node) -> str | None:
    """Why ``node`` cannot take part in a merge at all (None when it can)."""
    if node.op_type != "MatMulNBits" or node.domain != DOMAIN:
        return f"{node.domain or 'ai.onnx'}.{node.op_type} is not com.microsoft.MatMulNBits"
    inputs = list(node.inputs)
    if len(inputs) > 4 and any(v is not None for v in inputs[4:]):
        return "it has a g_idx or bias input"
    if not all(_constant(v) for v in inputs[1:3]) or (len(inputs) > 3 and inputs[3] is not None and not _constant(inputs[3])):
        return "its B, scales or zero points are not initializers"
    b = inputs[1].const_value if inputs[1] is not None else None
    if b is None or len(b.shape) != 3 or tuple(b.shape.numpy())[0] != _attribute(node, "N", -1):
        return "its B is not [N, n_blocks, blob]"
    if len(node.outputs) != 1:
        return "it has more than one output"
    return None


def _signature(node: ir.Node) -> tuple[object, ...]:
    inputs = list(node.inputs)
    has_zp = len(inputs) > 3 and inputs[3] is not None
    zp_dtype = inputs[3].const_value.dtype if has_zp and inputs[3] is not None and inputs[3].const_value is not None else None
    scales = inputs[2]
    assert scales is not None and scales.const_value is not None
    return (*(_attribute(node, a) for a in SHARED_ATTRIBUTES), scales.const_value.dtype,
            len(scales.const_value.shape), has_zp, zp_dtype)


def why_not_siblings(a: ir.Node, b: ir.Node) -> str | None:
    """Why ``a`` and ``b`` cannot be one MatMulNBits (None when they can)."""
    for node in (a, b):
        if (reason := why_not_mergeable(node)) is not None:
            return f"{node.name}: {reason}"
    if a.inputs[0] is not b.inputs[0]:
        return "they read different inputs"
    if a.graph is not b.graph:
        return "they are in different graphs"
    for name in SHARED_ATTRIBUTES:
        if _attribute(a, name) != _attribute(b, name):
            return f"their {name} differ ({_attribute(a, name)} vs {_attribute(b, name)})"
    if _signature(a) != _signature(b):
        return "their scales or zero points differ in type, rank or presence"
    return None


def sibling_groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """Groups (graph order, 2 or more nodes) of MatMulNBits nodes of ``graph`` that can merge."""
    by_input: dict[tuple[int, tuple[object, ...]], list[ir.Node]] = defaultdict(list)
    for node in graph:
        if why_not_mergeable(node) is None and node.inputs[0] is not None:
            by_input[(id(node.inputs[0]), _signature(node))].append(node)
    return [nodes for nodes in by_input.values() if len(nodes) > 1]


def _stacked(parts: list[ir.Value], name: str) -> ir.Value:
    """A lazy initializer: the parts' tensors concatenated along axis 0."""
    tensors = []
    for part in parts:
        assert part.const_value is not None  # why_not_mergeable: every part is an initializer
        tensors.append(part.const_value)
    dtype = tensors[0].dtype
    dims = [tuple(t.shape.numpy()) for t in tensors]
    shape = ir.Shape((sum(d[0] for d in dims), *dims[0][1:]))

    def load() -> ir.Tensor:
        return ir.Tensor(np.concatenate([t.numpy() for t in tensors], axis=0), dtype=dtype, name=name)

    return ir.Value(name=name, shape=shape, type=ir.TensorType(dtype),
                    const_value=ir.LazyTensor(load, dtype, shape, name=name))


def _joining_concat(outputs: list[ir.Value]) -> ir.Node | None:
    """The Concat that joins exactly ``outputs``, in order, on the last axis, and is their only use."""
    users = {id(use.node): use.node for out in outputs for use in out.uses()}
    if len(users) != 1 or any(out.is_graph_output() or len(out.uses()) != 1 for out in outputs):
        return None
    (concat,) = users.values()
    if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or list(concat.inputs) != outputs:
        return None
    axis = _attribute(concat, "axis", 0)
    rank = outputs[0].shape.rank() if outputs[0].shape is not None else None
    if not (axis == -1 or (rank is not None and axis == rank - 1)) or concat.outputs[0].is_graph_output():
        return None
    return concat


def merge_group(graph: ir.Graph, nodes: list[ir.Node], used_names: set[str], opset: int) -> MergedGroup:
    """Replace ``nodes`` (siblings, graph order) by one MatMulNBits, then a Split or nothing."""
    first = nodes[0]
    ns = [_attribute(n, "N") for n in nodes]
    base = first.name or "MatMulNBits"
    weights: list[ir.Value | None] = [nodes[0].inputs[0]]
    for i in range(1, len(first.inputs)):
        parts = [n.inputs[i] for n in nodes]
        if parts[0] is None:
            weights.append(None)
            continue
        value = _stacked([p for p in parts if p is not None], fresh_name(used_names, f"{parts[0].name}_merged"))
        graph.register_initializer(value)
        weights.append(value)
    attributes = {name: attr.value for name, attr in first.attributes.items()}
    attributes["N"] = sum(ns)
    merged = ir.node("MatMulNBits", weights, attributes=attributes, domain=DOMAIN,
                     name=fresh_name(used_names, f"{base}_merged"))
    merged.outputs[0].name = fresh_name(used_names, f"{base}_merged_out")
    graph.insert_before(first, merged)
    outputs = [n.outputs[0] for n in nodes]
    concat = _joining_concat(outputs)
    if concat is not None:
        concat.outputs[0].replace_all_uses_with(merged.outputs[0])
        graph.remove(concat, safe=True)
    else:
        split_name = fresh_name(used_names, f"{base}_merged_split")
        if opset >= 13:  # split sizes an input from opset 13, an attribute before
            sizes = ir.Value(name=fresh_name(used_names, f"{split_name}_sizes"), shape=ir.Shape([len(ns)]),
                             type=ir.TensorType(ir.DataType.INT64), const_value=ir.Tensor(np.asarray(ns, dtype=np.int64)))
            graph.register_initializer(sizes)
            split = ir.node("Split", [merged.outputs[0], sizes], attributes={"axis": -1},
                            num_outputs=len(ns), name=split_name)
        else:
            split = ir.node("Split", [merged.outputs[0]], attributes={"axis": -1, "split": ns},
                            num_outputs=len(ns), name=split_name)
        graph.insert_after(merged, split)
        for old, new in zip(outputs, split.outputs, strict=True):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            name = old.name
            old.name = None
            new.name = name
    for node in nodes:
        read = [v for v in node.inputs[1:] if v is not None]
        graph.remove(node, safe=True)
        for value in read:
            if not value.uses() and value.name is not None and value.name in graph.initializers:
                graph.initializers.pop(value.name)
    return MergedGroup(tuple(n.name or "" for n in nodes), tuple(ns), concat is not None)


def merge_siblings(model: ir.Model, used_names: set[str]) -> list[MergedGroup]:
    """Merge every group of sibling MatMulNBits nodes in ``model``'s main graph."""
    opset = model.opset_imports.get("", 13)
    return [merge_group(model.graph, nodes, used_names, opset) for nodes in sibling_groups(model.graph)]
