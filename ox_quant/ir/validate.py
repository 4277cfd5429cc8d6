"""Validating a model before ox-quant touches it: cheap checks on the graph, not the weights.

The checks run on the parsed ``ModelProto`` (external data not loaded), in this order, each
raising ``OxQuantError`` with a one-line reason:

1. versions: IR version and ai.onnx opset that the installed onnx reads (and, for models to
   be converted, an opset ox-quant converts); every string field is UTF-8;
2. external data: each location is a relative path inside the model's folder, names a
   regular file, and the file holds ``offset + size`` bytes, ``size`` following from the
   tensor's shape and dtype;
3. embedded tensors: ``raw_data`` (or the typed field) holds exactly as many elements or
   bytes as the shape and dtype say;
4. ONNX's checker with strict shape and type inference, on the file (it never reads
   external data); a missing opset import of ``com.microsoft`` or ``ox_quant``, which ONNX
   Runtime does not need, is added first (in memory); for a model whose embedded weights were left in the file
   (``ox_quant.ir.wire``), it runs on the parsed graph;

Quantized nodes (com.microsoft MatMulNBits and GatherBlockQuantized, ox_quant custom ops) are
checked by their formats (``ox_quant.formats.registry.check_quantized_nodes``), which
``ox_quant.pipeline.load`` runs after these. For models to be converted, ``ox_quant.runtime.loadable`` then asks ONNX Runtime to build a
session from the graph with every initializer turned into a graph input (:func:`weightless_copy`),
which checks what onnx's checker cannot (ops of other domains such as com.microsoft, their
attributes and types) without any weight. This module never imports onnxruntime.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto

from ox_quant.errors import OxQuantError, one_line

# Oldest IR version read: IR 3 introduced opset imports.
MIN_IR_VERSION = 3
# Oldest ai.onnx opset converted: ONNX Runtime only "guarantees" 7 and newer.
MIN_OPSET = 7
ONNX_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits, GatherBlockQuantized)
EXTERNAL_DATA_KEYS = {"location", "offset", "length", "checksum", "basepath"}  # the ONNX spec's

# Bits per element of the dtypes whose size ox-quant checks (others are left to the checker).
_BITS: dict[int, int] = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.BFLOAT16: 16, TensorProto.INT4: 4, TensorProto.UINT4: 4,
}
# Typed field that holds each dtype when raw_data is not used (one entry per element).
_TYPED_FIELD: dict[int, str] = {
    TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
    TensorProto.UINT64: "uint64_data", TensorProto.UINT32: "uint64_data",
    **{t: "int32_data" for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                 TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16)},
}


def check_versions(proto: onnx.ModelProto, name: str, runnable: bool) -> None:
    """IR version and ai.onnx opset are ones the installed onnx reads; with ``runnable``, ones
    ox-quant converts too (opset :data:`MIN_OPSET` and newer; whether ONNX Runtime runs it is
    checked by ``ox_quant.runtime.loadable``)."""
    ir_version = proto.ir_version
    if ir_version > onnx.IR_VERSION:
        raise OxQuantError(
            f"{name} has IR version {ir_version}, newer than the installed onnx {onnx.__version__} reads "
            f"(up to {onnx.IR_VERSION})"
        )
    if ir_version < MIN_IR_VERSION:
        raise OxQuantError(f"{name} has IR version {ir_version}; ox-quant reads IR {MIN_IR_VERSION} and newer")
    versions = [entry.version for entry in proto.opset_import if entry.domain in ONNX_DOMAINS]
    if not versions:
        raise OxQuantError(f"{name} does not import the ai.onnx opset (opset_import has no entry for it)")
    domains = [entry.domain or "ai.onnx" for entry in proto.opset_import]
    for domain in dict.fromkeys(domains):
        if domains.count(domain) > 1:
            raise OxQuantError(f"{name} imports the {domain} opset {domains.count(domain)} times")
    opset = versions[0]
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise OxQuantError(
            f"{name} uses ai.onnx opset {opset}, newer than the installed onnx {onnx.__version__} knows (up to {newest})"
        )
    if not runnable:
        return
    ms = [entry.version for entry in proto.opset_import if entry.domain == MS_DOMAIN]
    if ms and ms[0] != 1:
        raise OxQuantError(f"{name} imports com.microsoft opset {ms[0]}; ONNX Runtime's com.microsoft ops are version 1")
    if opset < MIN_OPSET:
        raise OxQuantError(
            f"{name} uses ai.onnx opset {opset}; ox-quant converts opset {MIN_OPSET} and newer "
            "(upgrade the model first, e.g. with onnx.version_converter)"
        )


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and all its subgraphs (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graphs(sub)


def tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer and tensor attribute, in every graph and model-local function."""
    all_graphs = list(graphs(proto.graph))
    nodes = [node for g in all_graphs for node in g.node] + [node for f in proto.functions for node in f.node]
    for g in all_graphs:
        yield from g.initializer
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def check_text(message: Message, name: str, where: str = "model") -> None:
    """Every string field (names, domains, metadata, doc strings) is valid UTF-8 text.

    protobuf hands an invalid UTF-8 ``string`` field back as ``bytes``, which the rest of the
    stack (the checker, onnx_ir) then trips over. Walks messages, not tensor data.
    """
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if _is_repeated(field) else [value]
            if any(isinstance(v, bytes) for v in values):
                raise OxQuantError(f"{name} is not a valid ONNX model: {where}.{field.name} is not valid UTF-8 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for i, item in enumerate(value if _is_repeated(field) else [value]):
                check_text(item, name, f"{where}.{field.name}[{i}]" if _is_repeated(field) else f"{where}.{field.name}")


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is going away
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _text(value: str | bytes, what: str) -> str:
    if isinstance(value, bytes):  # protobuf hands back invalid UTF-8 strings as bytes
        raise OxQuantError(f"{what} is not valid UTF-8 text")
    return value


def _numel(tensor: TensorProto) -> int | None:
    if any(d < 0 for d in tensor.dims):
        return None
    return math.prod(tensor.dims)


def expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's data occupies per its shape and dtype (None: not checked here)."""
    bits = _BITS.get(tensor.data_type)
    numel = _numel(tensor)
    if bits is None or numel is None:
        return None
    return math.ceil(numel * bits / 8)


def check_external_data(proto: onnx.ModelProto, base_dir: Path, name: str) -> None:
    """Each external tensor names a regular file inside ``base_dir`` that is long enough."""
    base = base_dir.resolve()
    for tensor in tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        label = f"tensor {_text(tensor.name, 'a tensor name in ' + name)!r}"
        if _numel(tensor) is None:
            raise OxQuantError(f"{label} has a negative dimension {list(tensor.dims)}")
        info: dict[str, str] = {}
        for entry in tensor.external_data:
            info[_text(entry.key, f"an external-data key of {label}")] = _text(
                entry.value, f"the external-data {entry.key} of {label}"
            )
        unknown = sorted(set(info) - EXTERNAL_DATA_KEYS)
        if unknown:
            raise OxQuantError(f"{label} has unknown external-data key {unknown[0]!r} (known: {', '.join(sorted(EXTERNAL_DATA_KEYS))})")
        location = info.get("location", "")
        if not location:
            raise OxQuantError(f"{label} is stored externally but names no file")
        if os.path.isabs(location) or os.path.normpath(location).split(os.sep)[0] == "..":
            raise OxQuantError(f"external data file {location!r} of {label} is outside the model's folder")
        path = base / location
        if not path.is_file():
            raise OxQuantError(f"external data file {location} of {label} is missing (or not a file)")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise OxQuantError(f"{label} has a non-numeric external-data offset or length") from None
        if offset < 0 or (length is not None and length < 0):
            raise OxQuantError(f"{label} has a negative external-data offset or length")
        needed = expected_nbytes(tensor)
        if needed is None:
            continue
        if length is not None and length != needed:
            raise OxQuantError(
                f"{label} declares {length} bytes of external data, but its shape {list(tensor.dims)} and dtype "
                f"{TensorProto.DataType.Name(tensor.data_type)} need {needed}"
            )
        size = path.stat().st_size
        if size < offset + needed:
            raise OxQuantError(
                f"external data file {location} is too short for {label} ({size} bytes, needs {offset + needed})"
            )


def check_tensor_sizes(proto: onnx.ModelProto, name: str) -> None:
    """Embedded tensors hold exactly the data their shape and dtype say."""
    for tensor in tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        label = f"tensor {_text(tensor.name, 'a tensor name in ' + name)!r}"
        numel = _numel(tensor)
        if numel is None:
            raise OxQuantError(f"{label} has a negative dimension {list(tensor.dims)}")
        if tensor.HasField("raw_data"):
            needed = expected_nbytes(tensor)
            if needed is not None and len(tensor.raw_data) != needed:
                raise OxQuantError(
                    f"{label} holds {len(tensor.raw_data)} bytes, but its shape {list(tensor.dims)} and dtype "
                    f"{TensorProto.DataType.Name(tensor.data_type)} need {needed}"
                )
            continue
        field = _TYPED_FIELD.get(tensor.data_type)
        if field is not None and len(getattr(tensor, field)) != numel:
            raise OxQuantError(
                f"{label} holds {len(getattr(tensor, field))} values, but its shape {list(tensor.dims)} has {numel}"
            )


# Domains whose nodes ONNX Runtime runs without an opset import (its own contrib ops and
# ox-quant's custom ops have one version, 1); ONNX's checker insists on the import.
IMPLIED_OPSETS = {"com.microsoft": 1, "ox_quant": 1}


def add_implied_opsets(proto: onnx.ModelProto) -> list[str]:
    """Add the missing opset import of each :data:`IMPLIED_OPSETS` domain that a node uses
    (ONNX Runtime's own quantizer writes MatMulNBits without one). In memory only; returns
    the domains added."""
    imported = {entry.domain for entry in proto.opset_import}
    used = {node.domain for g in graphs(proto.graph) for node in g.node}
    used |= {node.domain for f in proto.functions for node in f.node}
    added = sorted(d for d in IMPLIED_OPSETS if d in used and d not in imported)
    for domain in added:
        proto.opset_import.append(onnx.helper.make_opsetid(domain, IMPLIED_OPSETS[domain]))
    return added


def _checker_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its external-data locations marked as in-memory ("#" + location), which
    the checker does not look up (given a proto, it would resolve them against the working
    directory); :func:`check_external_data` has checked them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in tensors(copy):
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "#" + entry.value
    return copy


def check_structure(path: Path, proto: onnx.ModelProto | None = None) -> None:
    """ONNX's checker with strict shape and type inference, run on the file (or on ``proto``,
    parsed from it, when its opset imports were completed in memory or its embedded weights were
    left in the file).

    Given a path, the checker parses the graph itself and does not read external data, so the
    cost is that of the graph file, not the weights. A model whose embedded weights were left
    in the file (``ox_quant.ir.wire``) is checked from its small ``proto`` instead, which costs
    the graph where parsing the file would cost the weights.
    """
    try:
        if proto is None:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(_checker_copy(proto), full_check=True)
    except UnicodeDecodeError:  # the checker's own message quotes a name that is not UTF-8
        raise OxQuantError(f"{path.name} is not a valid ONNX model: it holds a name that is not valid UTF-8") from None
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        # ValueError: an enum out of range, e.g. "Invalid tensor data type 99."
        raise OxQuantError(f"{path.name} is not a valid ONNX model: {one_line(str(exc))}") from exc


SMALL_CONSTANT_BYTES = 4096  # Constant nodes up to this size stay (shapes, axes); larger become inputs


def _large_constant(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor of a top-level ``Constant`` node holding a weight-sized (or external) tensor."""
    if node.op_type != "Constant" or node.domain not in ONNX_DOMAINS or len(node.output) != 1:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            tensor = attr.t
            if tensor.data_location == TensorProto.EXTERNAL or (expected_nbytes(tensor) or 0) > SMALL_CONSTANT_BYTES:
                return tensor
    return None


def weightless_copy(proto: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    """The model with each top-level initializer, and each weight-sized ``Constant`` node,
    turned into a graph input of its type and shape: the graph without the weights."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = ir_version
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    graph, source = skeleton.graph, proto.graph
    graph.name = source.name
    constants = []
    for node in source.node:
        tensor = _large_constant(node)
        if tensor is None:
            graph.node.append(node)
        else:
            constants.append(onnx.helper.make_tensor_value_info(node.output[0], tensor.data_type, list(tensor.dims)))
    graph.input.extend(source.input)
    graph.input.extend(constants)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    inputs = {value.name for value in source.input}
    for tensor in source.initializer:
        if tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for sparse in source.sparse_initializer:
        if sparse.values.name not in inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type, list(sparse.dims))
            )
    return skeleton


def validate(proto: onnx.ModelProto, path: Path, runnable: bool, in_place: bool = False) -> None:
    """All checks of this module on ``proto`` (parsed from ``path``), cheapest first.

    ``runnable``: the model is to be converted (opsets ox-quant converts); whether ONNX Runtime
    accepts it is :func:`ox_quant.runtime.loadable.check_runnable`'s job.
    ``in_place``: ``proto`` refers to embedded tensors in the file (``ox_quant.ir.wire.scan``).
    """
    if not proto.HasField("graph"):
        raise OxQuantError(f"{path.name} is not an ONNX model: it has no graph")
    check_versions(proto, path.name, runnable)
    check_text(proto, path.name)
    check_external_data(proto, path.parent, path.name)
    check_tensor_sizes(proto, path.name)
    completed = add_implied_opsets(proto)
    check_structure(path, proto if completed or in_place else None)
