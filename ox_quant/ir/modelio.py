"""Loading models with memory-mapped weights, and saving them atomically.

External data is memory-mapped; so are the large tensors of a model file that embeds its
weights: :mod:`ox_quant.ir.wire` reads the file with those tensors as references into the file
itself, so the graph is parsed and the weights are not. Embedded outputs are written one
large tensor at a time. Outputs are written into a temporary folder beside the destination
and renamed into place (external data first, then the model), so a failure leaves no
partial file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from ox_quant.errors import OxQuantError
from ox_quant.ir import wire

if TYPE_CHECKING:
    import onnx

# Outputs whose initializers reach this many bytes use external data unless told otherwise:
# ONNX Runtime memory-maps an external data file, while embedded weights are copied onto its
# heap with the parsed protobuf (an int4 LLM-shaped model of 120 MiB: 94 MiB peak RSS from
# external data, 271 MiB embedded, on ORT CPU). Protobuf caps a single file at 2 GiB.
EXTERNAL_DATA_THRESHOLD = 32 * 1024 * 1024
PROTOBUF_LIMIT = 2**31 - 1
# Embedded tensors of at least this many bytes are read in place (wire.scan) and written
# streamed (wire.save_embedded). None: whole protos are parsed and serialized instead.
IN_PLACE_BYTES: int | None = 4096


def external_files(model: ir.Model) -> set[Path]:
    """Absolute paths of the external-data files a loaded model's initializers refer to."""
    files: set[Path] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return files


def find_error(exc: BaseException) -> OxQuantError | None:
    """The first ``OxQuantError`` in an exception chain (``onnx_ir`` wraps what lazy tensors raise)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OxQuantError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def root_cause(exc: BaseException) -> str:
    """The innermost cause of an exception chain, as one line."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_proto(path: Path) -> tuple[onnx.ModelProto, dict[int, int] | None]:
    """The model file's ``ModelProto`` without external data, and, if its large embedded
    tensors were left in the file (as external data naming the file itself: ``wire.scan``),
    the offsets of those read from typed fields (``Scan.typed``), else None.

    A file with more than one hard link is parsed whole (onnx_ir refuses to map such files);
    so is one the scan cannot read, and ONNX's parser gives the verdict.
    """
    import onnx

    if IN_PLACE_BYTES is not None and path.stat().st_nlink == 1:
        try:
            scanned = wire.scan(path, IN_PLACE_BYTES)
        except (wire.WireError, OSError, ValueError):
            scanned = None
        if scanned is not None and scanned.in_place:
            proto = onnx.ModelProto()
            try:
                proto.ParseFromString(scanned.data)
            except Exception:  # noqa: S110  the parser's verdict comes from onnx.load below
                pass
            else:
                return proto, scanned.typed
    try:
        return onnx.load(str(path), format="protobuf", load_external_data=False), None
    except Exception as exc:  # the parser's verdict on the bytes: protobuf DecodeError and kin
        raise OxQuantError(f"{path.name} is not a readable ONNX model: {root_cause(exc)}") from exc


def load_model(
    path: str | os.PathLike,
    runnable: bool = False,
    runtime_check: Callable[[onnx.ModelProto, Path], None] | None = None,
) -> ir.Model:
    """Load and validate an ONNX model; its weights stay on disk, memory-mapped on first use.

    Validation (``ox_quant.ir.validate``) reads the graph, not the weights. ``runnable``: the
    model is to be converted (opsets ox-quant converts). ``runtime_check(proto, path)`` runs
    after validation on the weight-free proto (e.g. ``ox_quant.runtime.loadable.check_runnable``,
    which asks ONNX Runtime), so that this layer never imports onnxruntime.
    """
    from ox_quant.ir.validate import validate

    path = Path(path)
    if not path.is_file():
        raise OxQuantError(f"{path}: no such file")
    proto, typed = read_proto(path)
    in_place = typed is not None
    validate(proto, path, runnable, in_place=in_place)
    if runtime_check is not None:
        runtime_check(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # a proto the checks above let through but the IR cannot hold
        raise OxQuantError(f"{path.name} is not a readable ONNX model: {root_cause(exc)}") from exc
    del proto
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    if in_place:  # through a symbolic link too, and in functions, which set_base_dir skips
        wire.rebase_in_place(model, path.name, path.resolve())
        model.meta[wire.TYPED_IN_PLACE] = (path.resolve(), typed)  # written back into those fields
    return model


def model_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus every external-data file it refers to."""
    path = Path(path)
    total = path.stat().st_size
    proto, _ = read_proto(path)
    seen: set[str] = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data = path.parent / entry.value
                if data.is_file() and data.resolve() != path.resolve():  # not weights read in place
                    total += data.stat().st_size
    return total


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def save_model_atomically(
    model: ir.Model,
    output: Path,
    external: bool,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> Path | None:
    """Write ``model`` to ``output`` (and ``<output>.data`` when ``external``).

    ``on_tensor(name, index, total)`` is called before each external tensor is written.
    Returns the external-data path, if any.
    """
    output = output.resolve()
    data_name = output.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".ox-quant-", dir=output.parent))
    except OSError as exc:
        raise OxQuantError(f"cannot write to {output.parent}: {exc.strerror or exc}") from exc
    try:
        tmp_model = tmp_dir / output.name
        callback = None
        if on_tensor is not None:
            def callback(tensor, info) -> None:
                on_tensor(tensor.name or "", info.index, info.total)
        if external or IN_PLACE_BYTES is None:
            ir.save(
                model,
                tmp_model,
                external_data=data_name if external else None,
                callback=callback if external else None,
            )
        else:
            wire.save_embedded(model, tmp_model, IN_PLACE_BYTES)
        data_path = None
        if external and (tmp_dir / data_name).exists():
            data_path = output.parent / data_name
            os.replace(tmp_dir / data_name, data_path)
        os.replace(tmp_model, output)
        return data_path
    except Exception as exc:
        found = find_error(exc)  # e.g. a weight that cannot be quantized, raised while saving
        if found is not None and found is not exc:
            raise found from None
        if isinstance(exc, OSError):
            raise OxQuantError(f"cannot write {output}: {exc.strerror or root_cause(exc)}") from exc
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
