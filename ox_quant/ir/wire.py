"""ONNX files at the protobuf wire level: embedded weights read in place and written streamed.

Protobuf encodes a message as fields ``varint(number << 3 | wire type)`` + value, where
wire type 0 is a varint, 1 eight bytes, 5 four bytes and 2 ``varint(length)`` + that many
bytes (strings, bytes, sub-messages, packed arrays). Groups (3, 4) do not occur in ONNX.
Only the messages on the way to a tensor are walked (:data:`CHILDREN`):
ModelProto.graph=7 / .functions=25, GraphProto.node=1 / .initializer=5,
NodeProto.attribute=5, AttributeProto.t=5 / .g=6 / .tensors=10 / .graphs=11,
FunctionProto.node=7; everything else is copied byte for byte.

* :func:`scan` reads a model file over ``mmap`` and returns a small serialization of it in
  which each tensor whose data holds at least ``min_bytes`` is an external-data tensor
  pointing into the file itself (location = the file's name, offset and length of the data
  bytes). The data is ``raw_data``, or a packed ``float_data`` of a FLOAT tensor or
  ``double_data`` of a DOUBLE one, whose bytes are the same little-endian values (exporters
  such as Paddle's write every weight that way); :attr:`Scan.typed` remembers which. The big fields are never copied: parsing the result costs the
  graph, not the weights, and the rest of ox-quant treats it like an external-data model.
* :func:`save_embedded` writes a model as one embedded file with one large tensor in memory
  at a time: the model is serialized with placeholders for its large tensors, and the file is
  written from that serialization, each placeholder's data streamed in where protobuf would
  have put the data (``raw_data``, or the typed field it was read from). The bytes are those
  of ``onnx_ir.save(model, path)`` from whole protos.
"""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

MODEL, GRAPH, NODE, ATTRIBUTE, FUNCTION, TENSOR = range(6)
# message kind -> {field number: kind of the sub-message in that field}
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH},
    FUNCTION: {7: NODE},
}
# TensorProto fields
DIMS, DATA_TYPE, FLOAT_DATA, NAME, RAW_DATA, DOUBLE_DATA, DOC_STRING, EXTERNAL_DATA, DATA_LOCATION = (
    1, 2, 4, 8, 9, 10, 12, 13, 14)
FLOAT, DOUBLE = 1, 11  # TensorProto.DataType
# Fields holding data as the bytes raw_data would: the dtype each is read in place for.
DATA_FIELDS = {RAW_DATA: None, FLOAT_DATA: FLOAT, DOUBLE_DATA: DOUBLE}
# A tensor with only these fields, one of them data, serializes the same from onnx_ir's
# external-tensor view.
IN_PLACE_FIELDS = {DIMS, DATA_TYPE, NAME, DOC_STRING, *DATA_FIELDS}
# ir.Model.meta key: (resolved model file, {offset: data field}) of the typed fields read in place
TYPED_IN_PLACE = "ox_quant.typed_in_place"
PLACEHOLDER = "ox-quant-stream:"  # location of a tensor whose data save_embedded streams in
COPY_CHUNK = 8 << 20

Buffer = bytes | mmap.mmap | memoryview


class WireError(ValueError):
    """The bytes are not protobuf wire format of the shape expected."""


@dataclass(frozen=True)
class Field:
    """One field of a message: its number and wire type, where its tag starts
    (``start``), where its value (the payload, for wire type 2) begins and ends."""

    number: int
    wire: int
    start: int
    begin: int
    end: int


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint: 7 bits a byte, low first, high bit = more."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def fields(buf: Buffer, start: int, end: int) -> Iterator[Field]:
    """The fields of the message ``buf[start:end]``, in order."""
    pos = start
    while pos < end:
        key, begin = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == 0:
            _, stop = read_varint(buf, begin, end)
        elif wire == 1:
            stop = begin + 8
        elif wire == 5:
            stop = begin + 4
        elif wire == 2:
            size, begin = read_varint(buf, begin, end)
            stop = begin + size
        else:
            raise WireError(f"wire type {wire}")
        if stop > end:
            raise WireError("field runs past its message")
        yield Field(number, wire, pos, begin, stop)
        pos = stop


# ---------------------------------------------------------------- reading: tensors in place


@dataclass(frozen=True)
class Scan:
    """A model file's serialization with its large tensors turned into references to the file."""

    data: bytes  # empty when no tensor is referenced in place (the file is then parsed as it is)
    in_place: int  # tensors referenced in place
    in_place_bytes: int  # their data bytes
    typed: dict[int, int]  # offset -> data field, for those read from float_data / double_data


class _Reader:
    def __init__(self, buf: Buffer, location: str, min_bytes: int):
        self.buf, self.location, self.min_bytes = buf, location, min_bytes
        self.count = self.nbytes = 0
        self.typed: dict[int, int] = {}

    def message(self, start: int, end: int, kind: int) -> bytes | None:
        """The rewritten message ``buf[start:end]``, or None if nothing in it changes."""
        if kind == TENSOR:
            return self.tensor(start, end)
        buf, children, out, run = self.buf, CHILDREN[kind], None, start
        for f in fields(buf, start, end):
            child = children.get(f.number)
            if child is None or f.wire != 2 or f.end - f.begin < self.min_bytes:
                continue  # a message smaller than min_bytes holds no tensor to move
            inner = self.message(f.begin, f.end, child)
            if inner is None:
                continue
            out = out if out is not None else bytearray()
            out += buf[run:f.start]
            out += tag(f.number, 2) + varint(len(inner)) + inner
            run = f.end
        if out is None:
            return None
        out += buf[run:end]
        return bytes(out)

    def tensor(self, start: int, end: int) -> bytes | None:
        """The TensorProto with its data replaced by a reference, or None to keep it.

        Only tensors made of :data:`IN_PLACE_FIELDS` (dims, data_type, name and doc_string
        once, one data field of :data:`DATA_FIELDS` in its dtype and packed) move: they are
        written back byte for byte.
        """
        buf = self.buf
        found = list(fields(buf, start, end))
        numbers = [f.number for f in found]
        data = [f for f in found if f.number in DATA_FIELDS]
        if not set(numbers) <= IN_PLACE_FIELDS or len(data) != 1 or numbers.count(DATA_TYPE) != 1:
            return None
        if numbers.count(NAME) > 1 or numbers.count(DOC_STRING) > 1:
            return None
        raw = data[0]
        if raw.wire != 2 or raw.end - raw.begin < self.min_bytes:
            return None
        for f in found:  # onnx_ir drops an empty name or doc string; keep those tensors as they are
            if f.number in (NAME, DOC_STRING) and (f.wire != 2 or f.end == f.begin):
                return None
            if f.number == DATA_TYPE and (f.wire != 0 or DATA_FIELDS[raw.number] not in (None, read_varint(buf, f.begin, f.end)[0])):
                return None
        out = bytearray()
        for f in found:
            if f is not raw:
                out += buf[f.start:f.end]
        entries = (("location", self.location), ("offset", str(raw.begin)), ("length", str(raw.end - raw.begin)))
        for key, value in entries:
            out += length_delimited(EXTERNAL_DATA, length_delimited(1, key.encode()) + length_delimited(2, value.encode()))
        out += tag(DATA_LOCATION, 0) + varint(1)
        self.count += 1
        self.nbytes += raw.end - raw.begin
        if raw.number != RAW_DATA:
            self.typed[raw.begin] = raw.number
        return bytes(out)


def scan_buffer(buf: Buffer, location: str, min_bytes: int) -> Scan:
    """:func:`scan` of the serialized ModelProto ``buf``, whose tensors ``location`` names."""
    if min_bytes < 1:
        raise ValueError("min_bytes must be positive")
    reader = _Reader(buf, location, min_bytes)
    data = reader.message(0, len(buf), MODEL)
    return Scan(data or b"", reader.count, reader.nbytes, reader.typed)


def scan(path: str | os.PathLike, min_bytes: int) -> Scan:
    """The model file ``path`` with every tensor of at least ``min_bytes`` of data
    referenced in place (``location`` = the file's name). Raises :class:`WireError` on bytes
    that are not a protobuf message (the caller then leaves the verdict to ONNX's parser)."""
    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return Scan(b"", 0, 0, {})
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return scan_buffer(buf, path.name, min_bytes)


# ---------------------------------------------------------------- writing: tensors streamed


def _streamed_size(tensor: ir.TensorProtocol) -> int:
    if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
        return tensor.length
    return tensor.nbytes


def _streamable(tensor: object, min_bytes: int) -> bool:
    """Tensors whose bytes are computed or read (not parsed protos, not strings) and large."""
    if tensor is None or isinstance(tensor, (ir.TensorProtoTensor, ir.StringTensor)):
        return False
    return _streamed_size(tensor) >= min_bytes  # type: ignore[arg-type]


def _placeholder(tensor: ir.TensorProtocol, index: int) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        f"{PLACEHOLDER}{index}",
        offset=None,
        length=None,
        dtype=tensor.dtype,
        shape=ir.Shape(tensor.shape.numpy()),
        name=tensor.name,  # type: ignore[arg-type]  # None: a nameless attribute tensor
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props),
    )


def _nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def swap_tensors(
    model: ir.Model,
    which: Callable[[ir.TensorProtocol], bool],
    replace: Callable[[ir.TensorProtocol, int], ir.TensorProtocol],
    initializers: bool = True,
) -> tuple[list[ir.TensorProtocol], Callable[[], None]]:
    """Replace each tensor for which ``which`` holds (initializers, unless ``initializers``
    is false, and node attributes, in every graph and function) by ``replace(tensor, index)``;
    return the replaced tensors in index order and a function that puts them back."""
    tensors: list[ir.TensorProtocol] = []
    undo: list[Callable[[], None]] = []
    for graph in model.graphs() if initializers else ():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and which(tensor):
                value.const_value = replace(tensor, len(tensors))
                tensors.append(tensor)
                undo.append(functools.partial(setattr, value, "const_value", tensor))
    for node in _nodes(model):
        for key, attr in list(node.attributes.items()):
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR and which(attr.value):
                new: ir.Attr = ir.AttrTensor(key, replace(attr.value, len(tensors)), doc_string=attr.doc_string)
                tensors.append(attr.value)
            elif attr.type == ir.AttributeType.TENSORS and any(which(t) for t in attr.value):
                items = []
                for t in attr.value:
                    if which(t):
                        items.append(replace(t, len(tensors)))
                        tensors.append(t)
                    else:
                        items.append(t)
                new = ir.AttrTensors(key, items, doc_string=attr.doc_string)
            else:
                continue
            node.attributes[key] = new
            undo.append(functools.partial(node.attributes.__setitem__, key, attr))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return tensors, restore


Piece = bytes | int  # bytes to write, or the index of a tensor whose data goes there


class _Splicer:
    def __init__(self, buf: bytes, sizes: Sequence[int], data_fields: Sequence[int]):
        self.buf, self.sizes, self.data_fields = buf, sizes, data_fields
        self.token = PLACEHOLDER.encode()

    def message(self, start: int, end: int, kind: int) -> tuple[list[Piece], int] | None:
        """The pieces of message ``buf[start:end]`` with placeholders filled, and their length."""
        if kind == TENSOR:
            return self.tensor(start, end)
        buf, children = self.buf, CHILDREN[kind]
        pieces: list[Piece] | None = None
        total = 0
        run = start
        for f in fields(buf, start, end):
            child = children.get(f.number)
            if child is None or f.wire != 2 or buf.find(self.token, f.begin, f.end) < 0:
                continue
            inner = self.message(f.begin, f.end, child)
            if inner is None:
                continue
            inner_pieces, inner_size = inner
            pieces = pieces if pieces is not None else []
            head = tag(f.number, 2) + varint(inner_size)
            pieces += [buf[run:f.start], head, *inner_pieces]
            total += f.start - run + len(head) + inner_size
            run = f.end
        if pieces is None:
            return None
        pieces.append(buf[run:end])
        return pieces, total + end - run

    def tensor(self, start: int, end: int) -> tuple[list[Piece], int] | None:
        buf = self.buf
        found = list(fields(buf, start, end))
        index = None
        for f in found:
            if f.number == EXTERNAL_DATA:
                entry = {e.number: buf[e.begin:e.end] for e in fields(buf, f.begin, f.end)}
                if entry.get(1) == b"location" and entry.get(2, b"").startswith(self.token):
                    index = int(entry[2][len(self.token):])
        if index is None:
            return None
        size, number = self.sizes[index], self.data_fields[index]
        raw: list[Piece] = [tag(number, 2) + varint(size), index]
        pieces: list[Piece] = []
        for f in found:  # protobuf writes fields in number order: the data goes before the first above it
            if f.number in (EXTERNAL_DATA, DATA_LOCATION):
                continue
            if raw and f.number > number:
                pieces += raw
                raw = []
            pieces.append(buf[f.start:f.end])
        pieces += raw
        return pieces, sum(len(p) if isinstance(p, bytes) else self.sizes[p] for p in pieces)


def _write_tensor(out, tensor: ir.TensorProtocol, size: int) -> None:
    """Write the tensor's raw bytes: an external tensor's straight from its file (exactly the
    stored bytes, never all in memory), any other as ``tobytes()``."""
    if isinstance(tensor, ir.ExternalTensor):
        buffer = bytearray(min(COPY_CHUNK, size))
        with open(tensor.path, "rb") as src:
            src.seek(tensor.offset or 0)
            left = size
            while left:
                view = memoryview(buffer)[: min(left, len(buffer))]
                got = src.readinto(view)
                if not got:
                    raise OSError(f"external data of tensor {tensor.name!r} ends early ({tensor.path})")
                out.write(view[:got])
                left -= got
        return
    data = tensor.tobytes()
    if len(data) != size:
        raise ValueError(f"tensor {tensor.name!r} gave {len(data)} bytes, its shape and dtype say {size}")
    out.write(data)
    del data


def data_field(model: ir.Model, tensor: ir.TensorProtocol) -> int:
    """The TensorProto field that holds ``tensor``'s data when written embedded: the typed
    field it was read from in place (``model.meta[TYPED_IN_PLACE]``), else ``raw_data``."""
    typed = model.meta.get(TYPED_IN_PLACE)
    if typed is None or not isinstance(tensor, ir.ExternalTensor) or tensor.offset is None:
        return RAW_DATA
    real, fields_at = typed
    if tensor.offset not in fields_at or Path(tensor.path).resolve() != real:
        return RAW_DATA
    return fields_at[tensor.offset]


def save_embedded(model: ir.Model, path: str | os.PathLike, min_bytes: int) -> int:
    """Write ``model`` to ``path`` as one file, every tensor embedded; return how many were
    streamed. Tensors of at least ``min_bytes`` that are not parsed protos are written one at
    a time (an external tensor's bytes copied from its file in chunks); the bytes written are
    those of ``onnx_ir.save(model, path)`` with those tensors held in memory.
    """
    tensors, restore = swap_tensors(model, lambda t: _streamable(t, min_bytes), _placeholder)
    try:
        small = ir.serde.serialize_model(model).SerializeToString()
    finally:
        restore()
    sizes = [_streamed_size(t) for t in tensors]
    spliced = _Splicer(small, sizes, [data_field(model, t) for t in tensors]).message(0, len(small), MODEL) if tensors else None
    pieces: list[Piece] = spliced[0] if spliced is not None else [small]
    placed = sorted(p for p in pieces if isinstance(p, int))
    if placed != list(range(len(tensors))):
        raise WireError("a streamed tensor's placeholder was not found in the serialized model")
    with open(path, "wb") as out:
        for piece in pieces:
            if isinstance(piece, int):
                _write_tensor(out, tensors[piece], sizes[piece])
            else:
                out.write(piece)
    return len(tensors)


def _names(tensor: object, location: str) -> bool:
    return isinstance(tensor, ir.ExternalTensor) and os.fspath(tensor.location) == location


def rebase_in_place(model: ir.Model, location: str, real: Path) -> int:
    """Point the external tensors whose location is ``location`` at ``real`` (the resolved
    model file), so that a model reached through a symbolic link reads its own file."""

    def moved(tensor: ir.TensorProtocol, _: int) -> ir.TensorProtocol:
        assert isinstance(tensor, ir.ExternalTensor)
        return ir.ExternalTensor(
            real.name,
            offset=tensor.offset,
            length=tensor.length,
            dtype=tensor.dtype,
            shape=ir.Shape(tensor.shape.numpy()),
            name=tensor.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=str(real.parent),
        )

    return len(swap_tensors(model, lambda t: _names(t, location), moved)[0])


def load_attribute_tensors(model: ir.Model, real: Path) -> int:
    """Read into memory the node-attribute tensors that refer to the file ``real`` (so that
    an output does not refer to its input), those read from a typed field back into it;
    return how many."""

    def loaded(tensor: ir.TensorProtocol, _: int) -> ir.TensorProtocol:
        array = tensor.numpy().copy()
        tensor.release()  # type: ignore[attr-defined]
        number = data_field(model, tensor)
        if number != RAW_DATA:
            import onnx

            proto = onnx.TensorProto(data_type=tensor.dtype.value, dims=list(tensor.shape.numpy()))
            if tensor.name:
                proto.name = tensor.name
            if tensor.doc_string:
                proto.doc_string = tensor.doc_string
            (proto.float_data if number == FLOAT_DATA else proto.double_data).extend(array.ravel().tolist())
            return ir.serde.TensorProtoTensor(proto)
        return ir.Tensor(
            array,
            dtype=tensor.dtype,
            name=tensor.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
        )

    def refers(tensor: ir.TensorProtocol) -> bool:
        return isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == real

    return len(swap_tensors(model, refers, loaded, initializers=False)[0])


def scan_reference(path: str | os.PathLike, min_bytes: int) -> tuple[bytes, int]:
    """The slow, obvious account of :func:`scan`: the whole file parsed by protobuf
    (canonical serialization) and how many tensors qualify to be read in place (made of
    :data:`IN_PLACE_FIELDS` only, a non-empty name and doc string when present, at least
    ``min_bytes`` of data in raw_data, or in float_data / double_data of a FLOAT / DOUBLE
    tensor), found through protobuf's own API."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    data_fields = {"raw_data": None, "float_data": onnx.TensorProto.FLOAT, "double_data": onnx.TensorProto.DOUBLE}

    def qualifies(tensor: onnx.TensorProto) -> bool:
        present = {field.name for field, _ in tensor.ListFields()}
        data = present & set(data_fields)
        if not present <= {"dims", "data_type", "name", "doc_string", *data_fields} or len(data) != 1:
            return False
        (field,) = data
        if "data_type" not in present or data_fields[field] not in (None, tensor.data_type):
            return False
        for text in ("name", "doc_string"):  # present but empty: ListFields omits it, HasField does not
            if tensor.HasField(text) and not getattr(tensor, text):
                return False
        nbytes = len(tensor.raw_data) if field == "raw_data" else len(getattr(tensor, field)) * (4 if field == "float_data" else 8)
        return nbytes >= min_bytes

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        yield from node_tensors(graph.node)

    def node_tensors(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    tensors = list(graph_tensors(proto.graph)) + [t for f in proto.functions for t in node_tensors(f.node)]
    return proto.SerializeToString(), sum(qualifies(t) for t in tensors)
