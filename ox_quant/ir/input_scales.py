"""Per-input-channel scales applied exactly in float: ``x @ W = (x / s) @ (diag(s) W)``.

The weights reading one activation tensor ``x[..., K]`` (an :class:`InputGroup`: all uses of
each are ``MatMul(x, W)`` or ``Gemm(x, W)``) get their K rows multiplied by ``s[K]``, and
``1 / s`` goes into the op that produces ``x``, when every reader of ``x`` is in the group and
``x`` is not a graph output:

==========================================  =========================================
producer of ``x``                            fold
==========================================  =========================================
``LayerNormalization`` / ``RMSNormalization``  scale (and bias) divided by ``s``
/ ``SimplifiedLayerNormalization``
``Mul(h, gamma)``, gamma constant ``[K]``    ``gamma / s`` (decomposed RMSNorm)
``MatMul(a, V)``, V constant ``[Kp, K]``     columns of ``V`` divided by ``s``
``Add(MatMul(a, V), b)``, b constant ``[K]``  columns of ``V`` and ``b`` divided by ``s``
==========================================  =========================================

Folded constants must have no other reader. Otherwise a ``Mul(x, 1/s)`` is inserted before the
group's first node and only the group's nodes read its output. Arithmetic is float64, the
results stored in each tensor's own dtype (float32 graphs stay equal to ~1e-7 relative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ox_quant.ir.names import fresh_name
from ox_quant.ir.sites import WeightSite

NORM_OPS = {("", "LayerNormalization"), ("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization")}


@dataclass
class InputGroup:
    """The weight sites that read the activation ``tensor`` (every use of each one)."""

    tensor: ir.Value
    sites: list[WeightSite]

    @property
    def k(self) -> int:
        return self.sites[0].k


def activation_of(site: WeightSite) -> ir.Value | str:
    """The one activation tensor every use of ``site`` multiplies, or why there is none."""
    found: list[ir.Value] = []
    for use in site.uses:
        if use.kind not in ("matmul", "gemm") or use.index != 1:
            return f"read by {use.op} as input {use.index}"
        if use.kind == "gemm":
            attr = use.node.attributes.get("transA")
            if attr is not None and attr.as_int():
                return "read by a Gemm with transA=1"
        x = use.node.inputs[0]
        if x is None:
            return "its node has no activation input"
        if all(x is not f for f in found):
            found.append(x)
    if len(found) != 1:
        return "its uses multiply different activations"
    return found[0]


def input_groups(sites: Sequence[WeightSite]) -> tuple[list[InputGroup], dict[str, str]]:
    """Sites grouped by the activation they multiply (in graph order), and the reason each
    site left out cannot be scaled."""
    groups: list[InputGroup] = []
    left_out: dict[str, str] = {}
    for site in sites:
        x = activation_of(site)
        if isinstance(x, str):
            left_out[site.name] = x
            continue
        for group in groups:
            if group.tensor is x:
                group.sites.append(site)
                break
        else:
            groups.append(InputGroup(x, [site]))
    for group in list(groups):
        graphs = {id(s.graph) for s in group.sites}
        if len(graphs) != 1:
            groups.remove(group)
            for s in group.sites:
                left_out[s.name] = "the weights reading its activation live in different graphs"
    order = {}
    for graph in {id(g.sites[0].graph): g.sites[0].graph for g in groups}.values():
        for i, node in enumerate(graph):
            order[id(node)] = i
    groups.sort(key=lambda g: min(order.get(id(u.node), 0) for s in g.sites for u in s.uses))
    return groups, left_out


def _array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return np.asarray(value.const_value.numpy())


def _set(value: ir.Value, array: np.ndarray) -> None:
    """Replace a constant's contents in place (the site and its readers keep the same value)."""
    old = value.const_value
    assert old is not None
    value.const_value = ir.Tensor(array.astype(old.numpy().dtype), name=value.name)


def _constant(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None and value.is_initializer()
            and not value.is_graph_input() and not value.is_graph_output() and len(value.uses()) == 1)


def _vector(value: ir.Value | None, k: int) -> bool:
    """A single-use constant that broadcasts as ``[K]`` along the last axis only."""
    if not _constant(value):
        return False
    assert value is not None
    shape = _array(value).shape
    return len(shape) >= 1 and shape[-1] == k and int(np.prod(shape)) == k


def _divide_last(value: ir.Value, s: np.ndarray) -> None:
    a = _array(value)
    _set(value, (a.astype(np.float64) / s.reshape((1,) * (a.ndim - 1) + (-1,))))


def _divide_columns(value: ir.Value, s: np.ndarray) -> None:
    a = _array(value)
    _set(value, a.astype(np.float64) / s[None, :])


def _matmul_fold(node: ir.Node, k: int) -> ir.Value | None:
    """The weight of ``MatMul(a, V)`` whose columns may take ``1/s``, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    v = node.inputs[1]
    if not _constant(v) or node.inputs[0] is None or node.inputs[0].const_value is not None:
        return None
    assert v is not None
    shape = _array(v).shape
    return v if len(shape) == 2 and shape[1] == k else None


def _fold_into_producer(x: ir.Value, s: np.ndarray) -> str | None:
    """Fold ``1/s`` into the op producing ``x``; what was done, or None when no fold applies."""
    node = x.producer()
    k = s.size
    if node is None or x.is_graph_output() or node.outputs[0] is not x:
        return None
    key = (node.domain or "", node.op_type)
    if key in NORM_OPS:
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != -1:
            return None
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if not _vector(scale, k) or (bias is not None and not _vector(bias, k)):
            return None
        assert scale is not None
        _divide_last(scale, s)
        if bias is not None:
            _divide_last(bias, s)
        return f"folded into {node.op_type} {node.name or ''}".rstrip()
    if key == ("", "Mul") and len(node.inputs) == 2:
        for gamma, other in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
            if _vector(gamma, k) and other is not None and other.const_value is None:
                assert gamma is not None
                _divide_last(gamma, s)
                return f"folded into the norm weight of Mul {node.name or ''}".rstrip()
        return None
    v = _matmul_fold(node, k)
    if v is not None:
        _divide_columns(v, s)
        return f"folded into the columns of MatMul {node.name or ''}".rstrip()
    if key == ("", "Add") and len(node.inputs) == 2:
        for bias, other in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
            if other is None or not _vector(bias, k):
                continue
            mm = other.producer()
            if mm is None or len(other.uses()) != 1 or other.is_graph_output():
                continue
            v = _matmul_fold(mm, k)
            if v is None:
                continue
            assert bias is not None
            _divide_columns(v, s)
            _divide_last(bias, s)
            return f"folded into the columns and bias of MatMul {mm.name or ''} + Add".rstrip()
    return None


def _insert_mul(group: InputGroup, s: np.ndarray, used_names: set[str]) -> str:
    """``x_s = Mul(x, 1/s)`` before the group's first node; the group's nodes read ``x_s``."""
    x = group.tensor
    graph = group.sites[0].graph
    dtype = x.dtype or group.sites[0].value.dtype
    assert dtype is not None
    base = x.name or group.sites[0].name
    inv = ir.Value(name=fresh_name(used_names, f"{base}.inv_input_scale"), shape=ir.Shape([s.size]),
                   type=ir.TensorType(dtype))
    inv.const_value = ir.Tensor((1.0 / s).astype(dtype.numpy()), name=inv.name)
    graph.register_initializer(inv)
    out = ir.Value(name=fresh_name(used_names, f"{base}.input_scaled"), shape=x.shape, type=x.type)
    mul = ir.Node("", "Mul", [x, inv], outputs=[out], name=fresh_name(used_names, f"{base}.input_scale_mul"))
    readers = {id(u.node) for site in group.sites for u in site.uses}
    first = next(node for node in graph if id(node) in readers)
    graph.insert_before(first, mul)
    for site in group.sites:
        for use in site.uses:
            if use.node.inputs[0] is x:
                use.node.replace_input_with(0, out)
    return "inserted Mul by 1/s"


def apply_input_scales(group: InputGroup, s: np.ndarray, used_names: set[str]) -> str:
    """Scale the group's weights by ``s[K]`` (K rows) and fold ``1/s`` before them (module
    docstring); returns what was done to the producer. ``used_names`` gains any new name."""
    s = np.asarray(s, dtype=np.float64)
    for site in group.sites:
        stored = _array(site.value).astype(np.float64)
        if site.layout == "KN":
            scaled = stored * s[:, None]
        else:  # stored [N, K]
            scaled = stored * s[None, :]
        _set(site.value, scaled)
    group_nodes = {id(u.node) for site in group.sites for u in site.uses}
    if all(id(u.node) in group_nodes and u.idx == 0 for u in group.tensor.uses()):
        done = _fold_into_producer(group.tensor, s)
        if done is not None:
            return done
    return _insert_mul(group, s, used_names)
