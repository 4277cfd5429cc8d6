"""Attributing a quantized model's error to its quantized weights ("isolation").

For every quantized weight of the candidate -- a node of any format of
``ox_quant.formats.registry`` (a ``DequantizeLinear`` whose input is an integer initializer,
``com.microsoft`` MatMulNBits or GatherBlockQuantized, ``ox_quant.MatMulNBits``) -- the weight
is dequantized in numpy by its format and matched with the float initializer it replaces in
the reference model:

1. a reference initializer with the name of the DequantizeLinear output and the same shape;
2. else the reference MatMul/Gemm node that produces the same output tensor as the
   candidate's consumer node (for the MatMulNBits-like formats also: the same node name, or
   the Gemm whose output is the node's output plus a bias ``Add``), taking its input 1 (a
   Gather's input 0 for GatherBlockQuantized).

The reference then runs once per matched weight with only that initializer replaced by
the dequantized values (an ORT session initializer override; files are not touched), and
its outputs are compared with the unmodified reference outputs. A layer's
``output_sqnr_db`` is therefore the error that this weight alone causes at the model's
outputs; ``weight_sqnr_db`` is the SQNR of the weight itself. Layers are sorted worst first.

Quantized activations are attributed the same way (``format`` ``activation``): for each
``QuantizeLinear -> DequantizeLinear`` (static scale and zero point) or ``DynamicQuantizeLinear
-> DequantizeLinear`` pair on a tensor the reference also has (by name), the reference runs with
only that pair inserted (its float weights untouched), so ``output_sqnr_db`` is the error that
quantizing this activation alone causes. ``weight_sqnr_db`` is NaN for them. Activations
quantized by other forms (per-token or per-channel float ops) and tensors the reference lacks
(a SmoothQuant ``Mul`` output) are listed as unmatched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.core.metrics import compare
from ox_quant.errors import OxQuantError


@dataclass(frozen=True)
class LayerError:
    """The error one quantized weight causes on its own."""

    weight: str
    """Name of the reference initializer that was replaced."""
    candidate_weight: str
    """Name of the candidate's quantized tensor (its format's codes input)."""
    format: str
    """The format's name: ``qdq``, ``matmulnbits``, ``gather_block_quantized`` or ``custom``."""
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
    """The node holding the weight (DequantizeLinear, MatMulNBits, GatherBlockQuantized, ...)."""
    values: np.ndarray
    """``layout == "output"`` (DequantizeLinear): its output. ``"kn"``: ``W [K, N]`` (a Gather
    table ``[V, D]`` as ``W = table.T``)."""
    layout: str = "kn"


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

    def dtype(self, name: str) -> int:
        return int(self.protos[name].data_type)


def quantized_weights(proto, tensors: _Tensors) -> tuple[list[QuantizedWeight], list[Unmatched]]:
    """Quantized weights of a model: the nodes of every registered format whose quantized
    inputs are initializers, dequantized by their format."""
    from ox_quant.formats.registry import format_of

    found: list[QuantizedWeight] = []
    problems: list[Unmatched] = []
    done: set[str] = set()  # codes tensors dequantized: a tied table is read by two nodes, attributed once
    for node in proto.graph.node:
        fmt = format_of(node.domain, node.op_type)
        if fmt is None:
            continue
        codes = node.input[fmt.code_input]
        if codes in done:
            continue
        result = fmt.dequantize(node, tensors)
        if result is None:
            continue  # e.g. a DequantizeLinear of an activation
        if isinstance(result, str):
            problems.append(Unmatched(codes, result))
            continue
        done.add(codes)
        found.append(QuantizedWeight(result.name, fmt.name, result.bits, node, result.values, result.layout))
    # a node its format could not read is no gap when another node read the same stored weight
    return found, [p for p in problems if p.candidate_weight not in done]


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
        if ref_node is not None and ref_node.op_type == "Gather" and ref_node.input and ref_node.input[0] in ref:
            name, replacement = ref_node.input[0], kn.T  # a table [V, D] is W.T
            return (name, replacement) if ref.shape(name) == replacement.shape else None
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

    if qw.layout == "output":
        out = qw.node.output[0]
        if out in ref and ref.shape(out) == qw.values.shape:
            return out, qw.values
        for node in cand_graph.node:
            for index, name in enumerate(node.input):
                if name != out or not node.output:
                    continue
                # the reference node computing the same output reads the float weight at the same input
                # (a Gemm whose bias was moved into an Add after it: the Add's output)
                ref_node = ref_producer.get(node.output[0])
                adds = [n for n in cand_graph.node if n.op_type == "Add" and node.output[0] in n.input]
                if ref_node is None and node.op_type == "Gemm" and len(adds) == 1:
                    ref_node = ref_producer.get(adds[0].output[0])
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
    return f"no reference MatMul/Gemm/Gather produces {node.output[0]!r} or is named {node.name!r}"


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
    if not found and not unmatched and not activation_pairs(cand_proto, cand_tensors):
        raise OxQuantError(
            f"{cand_path.name} has no quantized weights (DequantizeLinear on integer initializers, "
            "MatMulNBits, GatherBlockQuantized or ox_quant.MatMulNBits)"
        )
    pairs = activation_pairs(cand_proto, cand_tensors)
    output_names = [o.name for o in ref_proto.graph.output]
    layers = activation_errors(ref_proto, ref_path, pairs, feeds, reference_outputs, output_names, unmatched,
                               provider=provider)
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
        metrics = [compare(n, r, c) for n, r, c in zip(output_names, reference_outputs, got, strict=True)]
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


@dataclass(frozen=True)
class ActivationPair:
    """A quantized activation of the candidate: tensor ``x`` and its Q/DQ parameters (``scale``
    None: ``DynamicQuantizeLinear``)."""

    tensor: str
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int | None


def activation_pairs(proto, tensors: _Tensors) -> list[ActivationPair]:
    """Q -> DQ and DynamicQuantizeLinear -> DQ pairs on non-constant tensors, in graph order."""
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] in tensors:
            continue
        if node.op_type == "DynamicQuantizeLinear":
            if any(r.op_type == "DequantizeLinear" for r in readers.get(node.output[0], [])):
                pairs.append(ActivationPair(node.input[0], None, None, None))
        elif node.op_type == "QuantizeLinear" and len(node.input) > 1 and node.input[1] in tensors:
            if not any(r.op_type == "DequantizeLinear" for r in readers.get(node.output[0], [])):
                continue
            zp = tensors.array(node.input[2]) if len(node.input) > 2 and node.input[2] in tensors else None
            axis = _attr(node, "axis", None)
            pairs.append(ActivationPair(node.input[0], tensors.array(node.input[1]), zp, axis))
    return pairs


def _with_pair(ref_proto, pair: ActivationPair):
    """A copy of the reference graph with ``pair`` inserted after its tensor (weights by reference)."""
    from onnx import helper, numpy_helper

    new = type(ref_proto)()
    new.CopyFrom(ref_proto)  # the graph only: external weights stay references
    graph = new.graph
    x = pair.tensor
    q_out, dq_out = f"{x}__oxq_q", f"{x}__oxq_dq"
    if pair.scale is None:
        nodes = [helper.make_node("DynamicQuantizeLinear", [x], [q_out, q_out + "_s", q_out + "_zp"]),
                 helper.make_node("DequantizeLinear", [q_out, q_out + "_s", q_out + "_zp"], [dq_out])]
    else:
        inputs = [f"{x}__oxq_scale"] + ([f"{x}__oxq_zp"] if pair.zero_point is not None else [])
        graph.initializer.append(numpy_helper.from_array(np.asarray(pair.scale), inputs[0]))
        if pair.zero_point is not None:
            graph.initializer.append(numpy_helper.from_array(np.asarray(pair.zero_point), inputs[1]))
        nodes = [helper.make_node("QuantizeLinear", [x, *inputs], [q_out]),
                 helper.make_node("DequantizeLinear", [q_out, *inputs], [dq_out])]
        if pair.axis is not None:
            for node in nodes:
                node.attribute.append(helper.make_attribute("axis", int(pair.axis)))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == x:
                node.input[i] = dq_out
    position = 0
    for i, node in enumerate(graph.node):
        if x in node.output:
            position = i + 1
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    opset = next((o for o in new.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset.version < 13:
        opset.version = 13
    return new


def activation_errors(ref_proto, ref_path: Path, pairs: list[ActivationPair], feeds: Mapping[str, np.ndarray],
                      reference_outputs: Sequence[np.ndarray], output_names: list[str], unmatched: list[Unmatched],
                      *, provider: str = "cpu") -> list[LayerError]:
    """The output error each quantized activation causes alone (module doc)."""
    if not pairs:
        return []
    from ox_quant.runtime.ort import load as load_onnxruntime
    from ox_quant.runtime.session import PROVIDERS, make_session_options

    ort = load_onnxruntime()
    produced = {out for node in ref_proto.graph.node for out in node.output} | {i.name for i in ref_proto.graph.input}
    layers = []
    for pair in pairs:
        if pair.tensor not in produced:
            unmatched.append(Unmatched(pair.tensor, "activation: the reference has no tensor of this name"))
            continue
        options = make_session_options(exact=True)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(ref_path.resolve().parent))
        try:
            session = ort.InferenceSession(_with_pair(ref_proto, pair).SerializeToString(), sess_options=options,
                                           providers=[PROVIDERS[provider]])
        except Exception as exc:  # ORT raises several unrelated types
            unmatched.append(Unmatched(pair.tensor, f"activation: ONNX Runtime cannot run the reference with it "
                                                    f"quantized ({type(exc).__name__})"))
            continue
        wanted = {i.name for i in session.get_inputs()}
        got = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        metrics = [compare(n, r, c) for n, r, c in zip(output_names, reference_outputs, got, strict=True)]
        bits = 8
        layers.append(LayerError(weight=pair.tensor, candidate_weight=pair.tensor, format="activation", bits=bits,
                                 shape=(), weight_sqnr_db=float("nan"),
                                 output_sqnr_db=min(m.sqnr_db for m in metrics),
                                 output_cosine=min(m.cosine for m in metrics)))
    return layers
