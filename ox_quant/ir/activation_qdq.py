"""Quantizing activations in the graph: QuantizeLinear -> DequantizeLinear (and dynamic forms)
on the activation input of MatMul/Gemm/Conv nodes whose weight is a DequantizeLinear.

What ONNX Runtime's CPU optimizer fuses (measured with onnxruntime 1.32, the optimized graph of
``SessionOptions.optimized_model_filepath``; ``tests/test_activations.py`` asserts it):

=======================================================  ===========================================
pattern written                                           ONNX Runtime runs
=======================================================  ===========================================
``Q -> DQ(x)``, ``DQ(W int8)`` -> MatMul                  ``MatMulIntegerToFloat`` (float output)
``Q -> DQ(x)``, ``DQ(W int8, zp)`` -> Gemm                ``QGemm`` (needs the weight's zero point,
                                                          zeros for a symmetric weight)
``Q -> DQ(x)``, ``DQ(W int8)`` -> Conv -> ``Q -> DQ(y)``  ``QLinearConv`` (needs the output pair)
``DynamicQuantizeLinear -> DQ(x)``, ``DQ(W int8)`` -> MatMul  ``DynamicQuantizeMatMul``
per-channel (float ``Div/Round/Add/Clip/Sub/Mul``)        unfused: its int8 kernels take one
                                                          activation scale per tensor (a per-axis
                                                          ``Q -> DQ`` is fused into
                                                          MatMulIntegerToFloat, which then refuses
                                                          to run: "Per-Channel is not supported")
per-token (float ``Div/Round/Clip/Mul`` on each row)      unfused: ONNX has no per-row dynamic
                                                          quantize op and ORT no such kernel
=======================================================  ===========================================

uint8 activations with uint8 (asymmetric) weights run ONNX Runtime's u8u8 kernels, equal to the
unfused Q/DQ arithmetic; with int8 weights its AVX2 u8s8 kernels (no VNNI) saturate 16-bit pair
sums and drift (measured 0.1 relative error on a toy MatMul); int8 activations were not fused
at all on x86. A Gemm's bias is moved into an ``Add`` after it (QGemm fuses only a bias that is
itself an int32 DequantizeLinear). A tensor read by several such nodes (Q, K, V projections)
gets one pair, read by all of them; the float forms are exactly ONNX Q/DQ's arithmetic
(``Round`` is half to even, as QuantizeLinear).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ox_quant.core.act_quant import TINY
from ox_quant.ir.names import fresh_name

ACT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class ActivationSite:
    """An activation tensor ``x`` and the nodes that read it as input 0 against a quantized weight.

    ``channel_axis``: the axis of x's K channels (-1 for MatMul/Gemm, 1 for Conv). ``outputs``:
    Conv outputs that need their own pair for ONNX Runtime to fuse (static mode).
    """

    tensor: ir.Value
    graph: ir.Graph
    nodes: list[ir.Node] = field(default_factory=list)
    channel_axis: int = -1
    k: int = 0

    @property
    def name(self) -> str:
        return self.tensor.name or "?"

    @property
    def ops(self) -> str:
        return "+".join(sorted({n.op_type for n in self.nodes}))

    def conv_outputs(self) -> list[ir.Value]:
        return [n.outputs[0] for n in self.nodes if n.op_type == "Conv"]


def reads_quantized_weight(node: ir.Node) -> bool:
    """``node`` is a MatMul/Gemm/Conv whose input 1 is a DequantizeLinear of a constant."""
    if node.op_type not in ACT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    producer = w.producer() if w is not None else None
    return (producer is not None and producer.op_type == "DequantizeLinear"
            and producer.inputs[0] is not None and producer.inputs[0].const_value is not None)


def activation_sites(nodes: Sequence[tuple[ir.Node, ir.Graph, int]]) -> list[ActivationSite]:
    """Group ``(node, graph, K)`` by the activation tensor each node reads as input 0 (in the order given)."""
    sites: list[ActivationSite] = []
    for node, graph, k in nodes:
        x = node.inputs[0]
        if x is None:
            continue
        for site in sites:
            if site.tensor is x:
                if all(n is not node for n in site.nodes):
                    site.nodes.append(node)
                break
        else:
            sites.append(ActivationSite(x, graph, [node], 1 if node.op_type == "Conv" else -1, k))
    return sites


class _Names:
    def __init__(self, used: set[str]) -> None:
        self.used = used

    def __call__(self, base: str) -> str:
        return fresh_name(self.used, base)


def _const(graph: ir.Graph, names: _Names, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    name = names(base)
    tensor = ir.Tensor(array, name=name) if dtype is None else ir.Tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _node(op: str, inputs: Sequence[ir.Value | None], names: _Names, base: str, n_out: int = 1,
          **attributes: object) -> ir.Node:
    node = ir.node(op, list(inputs), attributes, name=names(f"{base}_{op}"), num_outputs=n_out)  # type: ignore[arg-type]
    for i, out in enumerate(node.outputs):
        out.name = names(f"{base}_{op}" + (f"_{i}" if n_out > 1 else ""))
    return node


def _float_dtype(x: ir.Value) -> np.dtype:
    return np.dtype(x.dtype.numpy()) if x.dtype is not None else np.dtype(np.float32)


def _insert(graph: ir.Graph, readers: Sequence[ir.Node], nodes: list[ir.Node]) -> None:
    ids = {id(n) for n in readers}
    first = next(n for n in graph if id(n) in ids)
    graph.insert_before(first, nodes)


def _rewire(readers: Sequence[ir.Node], old: ir.Value, new: ir.Value) -> None:
    for node in readers:
        for i, value in enumerate(node.inputs):
            if value is old and i == 0:
                node.replace_input_with(i, new)


def insert_static(site: ActivationSite, scale: np.ndarray, zero_point: np.ndarray, used: set[str],
                  axis: int | None = None) -> None:
    """``DQ(Q(x, scale, zp), scale, zp)`` read by the site's nodes; ``axis`` for per-channel scales."""
    names = _Names(used)
    x = site.tensor
    base = site.name
    s = _const(site.graph, names, f"{base}_scale", np.asarray(scale).astype(_float_dtype(x)))
    z = _const(site.graph, names, f"{base}_zero_point", np.asarray(zero_point))
    attrs = {} if axis is None else {"axis": axis}
    q = _node("QuantizeLinear", [x, s, z], names, base, **attrs)
    dq = _node("DequantizeLinear", [q.outputs[0], s, z], names, base, **attrs)
    dq.outputs[0].type = x.type
    dq.outputs[0].shape = x.shape
    _insert(site.graph, site.nodes, [q, dq])
    _rewire(site.nodes, x, dq.outputs[0])


def insert_output_pair(graph: ir.Graph, node: ir.Node, scale: np.ndarray, zero_point: np.ndarray,
                       used: set[str]) -> bool:
    """``Q -> DQ`` on ``node``'s output, read by all its former readers (False when the output
    is a graph output: left as it is)."""
    y = node.outputs[0]
    if y.is_graph_output():
        return False
    names = _Names(used)
    base = y.name or node.name or "y"
    readers = [(u.node, u.idx) for u in y.uses()]
    s = _const(graph, names, f"{base}_scale", np.asarray(scale).astype(_float_dtype(y)))
    z = _const(graph, names, f"{base}_zero_point", np.asarray(zero_point))
    q = _node("QuantizeLinear", [y, s, z], names, base)
    dq = _node("DequantizeLinear", [q.outputs[0], s, z], names, base)
    dq.outputs[0].type = y.type
    dq.outputs[0].shape = y.shape
    graph.insert_after(node, [q, dq])
    for reader, idx in readers:
        reader.replace_input_with(idx, dq.outputs[0])
    return True


def insert_dynamic(site: ActivationSite, used: set[str]) -> None:
    """``DynamicQuantizeLinear(x) -> DequantizeLinear`` (uint8, scale and zero point per call)."""
    names = _Names(used)
    x = site.tensor
    dyn = _node("DynamicQuantizeLinear", [x], names, site.name, n_out=3)
    dq = _node("DequantizeLinear", list(dyn.outputs), names, site.name)
    dq.outputs[0].type = x.type
    dq.outputs[0].shape = x.shape
    _insert(site.graph, site.nodes, [dyn, dq])
    _rewire(site.nodes, x, dq.outputs[0])


def insert_per_token(site: ActivationSite, used: set[str], opset: int) -> None:
    """Symmetric int8 per row of the last axis, computed at run time in float
    (``ox_quant.core.act_quant.per_token_fake_quant``): ``s = max(max|x_row| / 127, tiny)``,
    ``clip(round(x / s), -127, 127) * s``."""
    names = _Names(used)
    x = site.tensor
    dt = _float_dtype(x)
    base = site.name + "_token"
    g = site.graph
    nodes = [_node("Abs", [x], names, base)]
    if opset >= 18:
        axes = _const(g, names, f"{base}_axes", np.array([-1], dtype=np.int64))
        nodes.append(_node("ReduceMax", [nodes[-1].outputs[0], axes], names, base, keepdims=1))
    else:
        nodes.append(_node("ReduceMax", [nodes[-1].outputs[0]], names, base, axes=[-1], keepdims=1))
    nodes.append(_node("Div", [nodes[-1].outputs[0], _const(g, names, f"{base}_127", np.array(127.0, dt))], names, base))
    scale = _node("Max", [nodes[-1].outputs[0], _const(g, names, f"{base}_tiny", np.array(TINY, dt))], names, base)
    nodes.append(scale)
    nodes.append(_node("Div", [x, scale.outputs[0]], names, base + "_x"))
    nodes.append(_node("Round", [nodes[-1].outputs[0]], names, base))
    lo = _const(g, names, f"{base}_lo", np.array(-127.0, dt))
    hi = _const(g, names, f"{base}_hi", np.array(127.0, dt))
    nodes.append(_node("Clip", [nodes[-1].outputs[0], lo, hi], names, base))
    out = _node("Mul", [nodes[-1].outputs[0], scale.outputs[0]], names, base)
    nodes.append(out)
    out.outputs[0].type = x.type
    out.outputs[0].shape = x.shape
    _insert(g, site.nodes, nodes)
    _rewire(site.nodes, x, out.outputs[0])


def insert_fake_quant(site: ActivationSite, scale: np.ndarray, zero_point: np.ndarray, dtype: str,
                      used: set[str]) -> None:
    """Per-channel ``(clip(round(x / s) + zp, lo, hi) - zp) * s`` in float ops (``s``, ``zp`` along
    the site's channel axis; ``lo, hi`` the range of ``dtype``): Q/DQ's arithmetic, unfused."""
    names = _Names(used)
    x = site.tensor
    dt = _float_dtype(x)
    g = site.graph
    base = site.name + "_channel"
    shape: tuple[int, ...] = (-1,)
    if site.channel_axis != -1:  # Conv: x has the weight's rank, channels on axis 1
        w = site.nodes[0].inputs[1]
        rank = len(w.shape) if w is not None and w.shape is not None else len(x.shape or (0, 0, 0, 0))
        shape = (-1,) + (1,) * (rank - 2)
    s = _const(g, names, f"{base}_scale", np.asarray(scale, dt).reshape(shape))
    z = _const(g, names, f"{base}_zero_point", np.asarray(zero_point).astype(dt).reshape(shape))
    lo_v, hi_v = (0.0, 255.0) if dtype == "uint8" else (-128.0, 127.0)
    lo = _const(g, names, f"{base}_lo", np.array(lo_v, dt))
    hi = _const(g, names, f"{base}_hi", np.array(hi_v, dt))
    nodes = [_node("Div", [x, s], names, base)]
    nodes.append(_node("Round", [nodes[-1].outputs[0]], names, base))
    nodes.append(_node("Add", [nodes[-1].outputs[0], z], names, base))
    nodes.append(_node("Clip", [nodes[-1].outputs[0], lo, hi], names, base))
    nodes.append(_node("Sub", [nodes[-1].outputs[0], z], names, base))
    nodes.append(_node("Mul", [nodes[-1].outputs[0], s], names, base))
    nodes[-1].outputs[0].type = x.type
    nodes[-1].outputs[0].shape = x.shape
    _insert(g, site.nodes, nodes)
    _rewire(site.nodes, x, nodes[-1].outputs[0])


def split_gemm_bias(site: ActivationSite, used: set[str]) -> None:
    """``Gemm(A, B, C)`` -> ``Add(Gemm(A, B), beta * C)`` for each Gemm of the site (same values;
    ``site.nodes`` then holds the new Gemms)."""
    names = _Names(used)
    for i, node in enumerate(site.nodes):
        if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        graph = node.graph or site.graph
        c = node.inputs[2]
        attrs = {k: v for k, v in node.attributes.items() if k != "beta"}
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        gemm = ir.node("Gemm", [node.inputs[0], node.inputs[1]], attrs, name=names((node.name or "Gemm") + "_nobias"))
        gemm.outputs[0].name = names((node.outputs[0].name or "gemm") + "_nobias")
        gemm.outputs[0].type = node.outputs[0].type
        new = [gemm]
        if beta != 1.0:
            c_dt = _float_dtype(node.outputs[0])
            mul = _node("Mul", [c, _const(graph, names, f"{gemm.name}_beta", np.array(beta, c_dt))], names, gemm.name or "")
            new.append(mul)
            c = mul.outputs[0]
        add = ir.node("Add", [gemm.outputs[0], c], name=names((node.name or "Gemm") + "_bias"))
        new.append(add)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, add.outputs)
        site.nodes[i] = gemm


def add_weight_zero_points(nodes: Sequence[ir.Node], graph: ir.Graph, used: set[str]) -> int:
    """Give each Gemm's weight DequantizeLinear an explicit all-zero zero point when it has none
    (ONNX Runtime fuses QDQ Gemm into QGemm only then); returns how many were added."""
    names = _Names(used)
    added = 0
    for node in nodes:
        if node.op_type != "Gemm":
            continue
        w = node.inputs[1]
        dq = w.producer() if w is not None else None
        if dq is None or len(dq.inputs) > 2 or dq.inputs[0] is None or dq.inputs[1] is None:
            continue
        codes, scale = dq.inputs[0], dq.inputs[1]
        if codes.dtype not in (ir.DataType.INT8, ir.DataType.UINT8) or scale.shape is None:
            continue
        shape = tuple(int(d) for d in scale.shape)  # type: ignore[arg-type]
        zeros = np.zeros(shape, dtype=np.int8 if codes.dtype == ir.DataType.INT8 else np.uint8)
        zp = _const(graph, names, f"{codes.name}_zero_point", zeros)
        if len(dq.inputs) < 3:
            dq.resize_inputs(3)
        dq.replace_input_with(2, zp)
        added += 1
    return added
