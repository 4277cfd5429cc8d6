"""Fold weights that are not plain initializers into initializers, so they quantize alike.

* ``Constant`` nodes holding a tensor become initializers (some exporters store every
  weight this way).
* Chains ``Identity | Transpose | Cast | Reshape`` applied to an initializer that nothing
  else reads become one initializer. The folded tensor is lazy: computed from the source
  (memory-mapped) when it is read, so folding costs no memory up front.

A source read by several nodes is left alone (folding would store it twice); a tied
``Transpose`` of an embedding table is understood by :mod:`ox_quant.ir.sites` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

FOLDABLE = ("Identity", "Transpose", "Cast", "Reshape")


def _is_constant_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None and not value.is_graph_input()


def _replace_by_initializer(graph: ir.Graph, node: ir.Node, tensor: ir.TensorProtocol) -> None:
    """Detach ``node``, drop it, and let an initializer of its output's name take its place."""
    out = node.outputs[0]
    name = out.name
    value = ir.Value(shape=ir.Shape(tensor.shape),  # type: ignore[arg-type]  # stub: a tensor's dims are ints
                      type=ir.TensorType(tensor.dtype), const_value=tensor)
    out.replace_all_uses_with(value)
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    graph.remove(node, safe=True)
    out.name = None
    value.name = name
    graph.register_initializer(value)


def _constant_to_initializer(graph: ir.Graph, node: ir.Node) -> bool:
    attr = node.attributes.get("value")
    out = node.outputs[0]
    if attr is None or out.is_graph_output() or not out.name or out.name in graph.initializers:
        return False
    if attr.type != ir.AttributeType.TENSOR:
        return False
    _replace_by_initializer(graph, node, attr.as_tensor())
    return True


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...] | None:
    dims = [int(d) for d in target.reshape(-1)]
    if not allowzero:
        dims = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(dims)]
    if dims.count(-1) > 1:
        return None
    total = int(np.prod(shape))
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1])) or 1
        if total % known:
            return None
        dims[dims.index(-1)] = total // known
    return tuple(dims) if int(np.prod(dims)) == total else None


def _fold_unary(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace ``node(initializer)`` by an initializer computed lazily; True if folded."""
    source = node.inputs[0] if node.inputs else None
    out = node.outputs[0]
    if not _is_constant_initializer(source) or out.is_graph_output() or not out.name:
        return False
    assert source is not None and source.const_value is not None
    if len(source.uses()) != 1:
        return False
    src_tensor = source.const_value
    shape: tuple[int, ...] = tuple(src_tensor.shape)  # type: ignore[arg-type]  # stub: a tensor's dims are ints
    dtype = src_tensor.dtype
    op = node.op_type
    func: Callable[[np.ndarray], np.ndarray]
    if op == "Identity":
        func = lambda a: a  # noqa: E731
    elif op == "Transpose":
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(shape))))
        if sorted(perm) != list(range(len(shape))):
            return False
        shape = tuple(shape[p] for p in perm)

        def transpose(a: np.ndarray, perm: tuple[int, ...] = perm) -> np.ndarray:
            return np.ascontiguousarray(np.transpose(a, perm))

        func = transpose
    elif op == "Cast":
        to = node.attributes.get("to")
        if to is None:
            return False
        dtype = ir.DataType(to.as_int())
        try:
            target = dtype.numpy()
        except Exception:
            return False

        def cast(a: np.ndarray, target: np.dtype = target) -> np.ndarray:
            return a.astype(target)

        func = cast
    elif op == "Reshape":
        target_value = node.inputs[1] if len(node.inputs) > 1 else None
        if target_value is None or target_value.const_value is None:
            return False
        allowzero = node.attributes.get("allowzero")
        new_shape = _reshape_target(shape, np.asarray(target_value.const_value.numpy()), bool(allowzero and allowzero.as_int()))
        if new_shape is None:
            return False
        shape = new_shape

        def reshape(a: np.ndarray, s: tuple[int, ...] = new_shape) -> np.ndarray:
            return a.reshape(s)

        func = reshape
    else:
        return False

    def load(src=src_tensor, func=func, dtype=dtype, name=out.name) -> ir.Tensor:
        return ir.Tensor(func(np.asarray(src.numpy())), dtype=dtype, name=name)

    inputs = [v for v in node.inputs if v is not None]
    _replace_by_initializer(graph, node, ir.LazyTensor(load, dtype, ir.Shape(shape), name=out.name))
    for value in inputs:
        if value.is_initializer() and not value.uses() and graph.initializers.get(value.name or "") is value:
            graph.initializers.pop(value.name or "")
    return True


def fold_constant_weights(model: ir.Model) -> int:
    """Fold Constant nodes and constant chains in every graph; return how many nodes went."""
    folded = 0
    for graph in model.graphs():
        changed = True
        while changed:
            changed = False
            for node in list(graph):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Constant":
                    done = _constant_to_initializer(graph, node)
                elif node.op_type in FOLDABLE:
                    done = _fold_unary(graph, node)
                else:
                    continue
                folded += done
                changed |= done
    return folded
