"""Attributing a quantized model's error to its quantized weights ("isolation").

For every quantized weight of the candidate -- a ``DequantizeLinear`` whose input is an
integer initializer, or a ``com.microsoft.MatMulNBits`` node -- the weight is dequantized
in numpy (``ox_quant.core.dequant``) and matched with the float initializer it replaces in the
reference model:

1. a reference initializer with the name of the DequantizeLinear output and the same shape;
2. else the reference MatMul/Gemm node that produces the same output tensor as the
   candidate's consumer node (for MatMulNBits also: the same node name, or the Gemm whose
   output is the MatMulNBits output plus a bias ``Add``), taking its input 1.

The reference then runs once per matched weight with only that initializer replaced by
the dequantized values (an ORT session initializer override; files are not touched), and
its outputs are compared with the unmodified reference outputs. A layer's
``output_sqnr_db`` is therefore the error that this weight alone causes at the model's
outputs; ``weight_sqnr_db`` is the SQNR of the weight itself. Layers are sorted worst first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ox_quant.core.dequant import dequantize_linear, dequantize_matmulnbits
from ox_quant.errors import OxQuantError
from ox_quant.core.metrics import compare

_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT2": 2, "UINT2": 2}


@dataclass(frozen=True)
class LayerError:
    """The error one quantized weight causes on its own."""

    weight: str
    """Name of the reference initializer that was replaced."""
    candidate_weight: str
    """Name of the candidate's quantized tensor (DequantizeLinear input or MatMulNBits B)."""
    format: str
    """``"qdq"`` or ``"matmulnbits"``."""
    bits: int
    shape: tuple[int, ...]
    weight_sqnr_db: float
    output_sqnr_db: float
    """Lowest SQNR over the model outputs with only this weight quantized."""
    output_cosine: float
    """Lowest cosine similarity over the model outputs with only this weight quantized."""


@dataclass(frozen=True)
class Unmatched:
    candidate_weight: str
    reason: str


@dataclass(frozen=True)
class LayerReport:
    method: str
    layers: tuple[LayerError, ...]
    """Worst (lowest ``output_sqnr_db``) first."""
    unmatched: tuple[Unmatched, ...]


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight found in the candidate, dequantized to the float tensor its
    consumer reads (``weight_kn`` is that tensor as ``[K, N]`` when it is a matmul weight)."""

    name: str
    format: str
    bits: int
    node: Any
    """The DequantizeLinear or MatMulNBits node."""
    values: np.ndarray
    """DequantizeLinear: its output. MatMulNBits: ``W [K, N]``."""


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OxQuantError(f"cannot read ONNX model {path}: {exc}") from exc


class _Tensors:
    """Initializers of a model, read (with external data) on demand."""

    def __init__(self, proto, base_dir: Path) -> None:
        self.protos = {t.name: t for t in proto.graph.initializer}
        self.base_dir = base_dir

    def __contains__(self, name: str) -> bool:
        return name in self.protos

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.protos[name].dims)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.protos[name], base_dir=str(self.base_dir))


def quantized_weights(proto, tensors: _Tensors) -> tuple[list[QuantizedWeight], list[Unmatched]]:
    """Quantized weights of a model: DequantizeLinear nodes on integer initializers and
    MatMulNBits nodes (all of whose quantized inputs must be initializers)."""
    import onnx

    found: list[QuantizedWeight] = []
    problems: list[Unmatched] = []
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            x_name = node.input[0]
            if x_name not in tensors:
                continue  # an activation, not a weight
            type_name = onnx.TensorProto.DataType.Name(tensors.protos[x_name].data_type)
            if type_name not in _BITS:
                continue
            if node.input[1] not in tensors or (len(node.input) > 2 and node.input[2] and node.input[2] not in tensors):
                problems.append(Unmatched(x_name, "scale or zero point is not an initializer"))
                continue
            zero_point = tensors.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            values = dequantize_linear(
                tensors.array(x_name),
                tensors.array(node.input[1]),
                zero_point,
                axis=int(_attr(node, "axis", 1)),
                block_size=int(_attr(node, "block_size", 0)),
            )
            found.append(QuantizedWeight(x_name, "qdq", _BITS[type_name], node, values))
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            b_name = node.input[1]
            inputs = [name for name in node.input[1:4] if name]
            if not all(name in tensors for name in inputs):
                problems.append(Unmatched(b_name, "B, scales or zero points are not initializers"))
                continue
            if len(node.input) > 4 and node.input[4]:
                problems.append(Unmatched(b_name, "MatMulNBits with g_idx is not supported"))
                continue
            bits = int(_attr(node, "bits", 4))
            zero_points = tensors.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            values = dequantize_matmulnbits(
                tensors.array(b_name),
                tensors.array(node.input[2]),
                zero_points,
                k=int(_attr(node, "K", 0)),
                n=int(_attr(node, "N", 0)),
                bits=bits,
                block_size=int(_attr(node, "block_size", 0)),
            )
            found.append(QuantizedWeight(b_name, "matmulnbits", bits, node, values))
    return found, problems


def _as_kn(node, array: np.ndarray) -> np.ndarray:
    """A MatMul/Gemm input-1 tensor as ``[K, N]`` (Gemm ``transB=1`` stores ``[N, K]``)."""
    if node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
        return array.T
    return array


def _match(qw: QuantizedWeight, cand_graph, ref_graph, ref: _Tensors) -> tuple[str, np.ndarray] | str:
    """``(reference initializer, replacement array)`` or a reason why there is none."""
    ref_producer = {out: node for node in ref_graph.node for out in node.output if out}
    ref_by_name = {node.name: node for node in ref_graph.node if node.name}

    def matmul_weight(ref_node, kn: np.ndarray) -> tuple[str, np.ndarray] | None:
        if ref_node is None or ref_node.op_type not in ("MatMul", "Gemm") or len(ref_node.input) < 2:
            return None
        name = ref_node.input[1]
        replacement = _as_kn(ref_node, kn)  # transposing twice is the identity
        transpose = ref_producer.get(name)
        if name not in ref and transpose is not None and transpose.op_type == "Transpose" and replacement.ndim == 2:
            name, replacement = transpose.input[0], replacement.T  # a tied table read as MatMul(h, Transpose(T))
        if name not in ref:
            return None
        if ref.shape(name) != replacement.shape:
            return None
        return name, replacement

    if qw.format == "qdq":
        out = qw.node.output[0]
        if out in ref and ref.shape(out) == qw.values.shape:
            return out, qw.values
        for node in cand_graph.node:
            for index, name in enumerate(node.input):
                if name != out or not node.output:
                    continue
                # the reference node computing the same output reads the float weight at the same input
                ref_node = ref_producer.get(node.output[0])
                if ref_node is not None and index < len(ref_node.input):
                    ref_name = ref_node.input[index]
                    if ref_name in ref and ref.shape(ref_name) == qw.values.shape:
                        return ref_name, qw.values
                if index == 1 and node.op_type in ("MatMul", "Gemm"):
                    hit = matmul_weight(ref_producer.get(node.output[0]), _as_kn(node, qw.values))
                    if hit:
                        return hit
        return f"no reference initializer named {out!r} and no matching consumer in the reference"
    node = qw.node
    candidates = [ref_producer.get(node.output[0]), ref_by_name.get(node.name)]
    adds = [n for n in cand_graph.node if n.op_type == "Add" and node.output[0] in n.input]
    if len(adds) == 1:
        candidates.append(ref_producer.get(adds[0].output[0]))
    for ref_node in candidates:
        hit = matmul_weight(ref_node, qw.values)
        if hit:
            return hit
    return f"no reference MatMul/Gemm produces {node.output[0]!r} or is named {node.name!r}"


def attribute_errors(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    reference_outputs: Sequence[np.ndarray],
    *,
    provider: str = "cpu",
    exact: bool = True,
) -> LayerReport:
    """Per-weight isolation (see module doc). ``reference_outputs`` are the unmodified
    reference model's outputs on ``feeds``, in its output order."""
    from ox_quant.runtime.session import make_session

    ref_path, cand_path = Path(reference), Path(candidate)
    ref_proto, cand_proto = _load(ref_path), _load(cand_path)
    ref_tensors = _Tensors(ref_proto, ref_path.parent)
    cand_tensors = _Tensors(cand_proto, cand_path.parent)
    found, unmatched = quantized_weights(cand_proto, cand_tensors)
    if not found and not unmatched:
        raise OxQuantError(f"{cand_path.name} has no quantized weights (DequantizeLinear on integer initializers or MatMulNBits)")
    output_names = [o.name for o in ref_proto.graph.output]
    layers = []
    for qw in found:
        hit = _match(qw, cand_proto.graph, ref_proto.graph, ref_tensors)
        if isinstance(hit, str):
            unmatched.append(Unmatched(qw.name, hit))
            continue
        ref_name, replacement = hit
        original = ref_tensors.array(ref_name)
        replacement = np.ascontiguousarray(replacement, dtype=original.dtype)
        session = make_session(ref_path, provider, exact=exact, initializers={ref_name: replacement})
        wanted = {i.name for i in session.get_inputs()}
        got = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        metrics = [compare(n, r, c) for n, r, c in zip(output_names, reference_outputs, got)]
        layers.append(
            LayerError(
                weight=ref_name,
                candidate_weight=qw.name,
                format=qw.format,
                bits=qw.bits,
                shape=tuple(original.shape),
                weight_sqnr_db=compare(ref_name, original, replacement).sqnr_db,
                output_sqnr_db=min(m.sqnr_db for m in metrics),
                output_cosine=min(m.cosine for m in metrics),
            )
        )
    layers.sort(key=lambda layer: (layer.output_sqnr_db, layer.weight))
    return LayerReport("isolation", tuple(layers), tuple(unmatched))
