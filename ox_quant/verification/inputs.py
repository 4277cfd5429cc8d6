"""Model inputs for verification: read from an ``.npz`` file or generated from the
ONNX model's input specs with a fixed seed.

Generation rules (each overridable):

* symbolic dims: ``dims[name]`` if given, else 2 for names containing "batch", else 16;
* float inputs: standard normal;
* integer inputs: uniform in ``[lo, hi)``; ``lo, hi`` from ``int_range`` if given, else
  ``[0, rows)`` when the input indexes an embedding table (it feeds, possibly through
  Cast/Reshape/Unsqueeze/Flatten/Identity, the indices of a Gather whose data is an
  initializer with ``rows`` entries on the gathered axis), else ``[0, 16)``;
* bool inputs: fair coin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ox_quant.errors import OxQuantError

BATCH_SIZE = 2
OTHER_DIM_SIZE = 16
DEFAULT_INT_RANGE = (0, 16)
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: numpy dtype and shape (int, symbolic name, or None if unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def load_graph(model: str | os.PathLike):
    """The model's ``GraphProto`` without weight data (external data is not read)."""
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:
        raise OxQuantError(f"cannot read ONNX model {model}: {exc}") from exc


def input_specs(graph) -> list[InputSpec]:
    """Inputs of ``graph`` that are not initializers."""
    from onnx import helper

    initializer_names = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
        specs.append(InputSpec(value.name, dtype, tuple(shape)))
    return specs


def embedding_rows(graph, input_name: str) -> int | None:
    """Rows of the smallest embedding table that ``input_name`` indexes, if any."""
    sizes = {t.name: (list(t.dims)) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    found: list[int] = []
    frontier, seen = [input_name], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for node, index in consumers.get(name, []):
            if node.op_type in _PASS_THROUGH and index == 0:
                frontier.extend(node.output)
            elif node.op_type == "Gather" and index == 1 and node.input[0] in sizes:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = sizes[node.input[0]]
                if dims:
                    found.append(int(dims[axis]))
    return min(found) if found else None


def resolve_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape for ``spec``: symbolic dims from ``dims`` or the defaults above."""
    shape = []
    for dim in spec.shape:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim is not None and dim in dims:
            shape.append(int(dims[dim]))
        elif dim is not None and "batch" in dim.lower():
            shape.append(BATCH_SIZE)
        else:
            shape.append(OTHER_DIM_SIZE)
    return tuple(shape)


def value_rule(graph, spec: InputSpec, int_range: tuple[int, int] | None = None) -> str:
    """How :func:`generate_inputs` fills ``spec``, in words (e.g. ``"integers in [0, 16)
    (default range)"``), so that reports can say what the model was fed."""
    if spec.dtype.kind == "f":
        return "standard normal"
    if spec.dtype.kind == "b":
        return "fair coin"
    if spec.dtype.kind in "iu":
        lo, hi, why = _int_bounds(graph, spec, int_range)
        return f"integers in [{lo}, {hi}) ({why})"
    return f"cannot be generated ({spec.dtype})"


def _int_bounds(graph, spec: InputSpec, int_range: tuple[int, int] | None) -> tuple[int, int, str]:
    """``(lo, hi, why)`` of the half-open range generated integer input ``spec`` takes."""
    if int_range is not None:
        return int_range[0], int_range[1], "--int-range"
    rows = embedding_rows(graph, spec.name)
    if rows:
        return 0, rows, "rows of the embedding table it indexes"
    return DEFAULT_INT_RANGE[0], DEFAULT_INT_RANGE[1], "default range: set it with --int-range LO:HI"


def generate_inputs(
    graph,
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, following the module's rules."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in input_specs(graph):
        shape = resolve_shape(spec, dims or {})
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype.kind in "iu":
            lo, hi, _ = _int_bounds(graph, spec, int_range)
            if hi <= lo:
                raise OxQuantError(f"input {spec.name!r}: empty integer range [{lo}, {hi})")
            arrays[spec.name] = rng.integers(lo, hi, shape).astype(spec.dtype)
        else:
            raise OxQuantError(f"input {spec.name!r}: cannot generate values of dtype {spec.dtype}")
    return arrays


def load_inputs(path: str | os.PathLike, graph) -> dict[str, np.ndarray]:
    """Arrays for every graph input from an ``.npz`` file (keys = input names), cast to the
    input dtypes. Extra keys are ignored; a missing key or a rank mismatch is an error."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            stored = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise OxQuantError(f"inputs file not found: {path}") from None
    except Exception as exc:
        raise OxQuantError(f"cannot read inputs file {path}: {exc}") from exc
    arrays = {}
    for spec in input_specs(graph):
        if spec.name not in stored:
            raise OxQuantError(f"inputs file {path} has no array named {spec.name!r} (has: {', '.join(stored) or 'none'})")
        array = stored[spec.name]
        if array.ndim != len(spec.shape):
            raise OxQuantError(f"input {spec.name!r}: array of rank {array.ndim}, model expects rank {len(spec.shape)}")
        arrays[spec.name] = array.astype(spec.dtype, copy=False)
    return arrays


def parse_int_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` -> ``(LO, HI)``, the half-open range ``[LO, HI)``."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        low, high = int(lo), int(hi)
    except ValueError:
        raise OxQuantError(f"integer range {text!r}: expected LO:HI, e.g. 0:1000") from None
    if high <= low:
        raise OxQuantError(f"integer range {text!r}: HI must be greater than LO")
    return low, high


def parse_dim(text: str) -> tuple[str, int]:
    """``"NAME=SIZE"`` -> ``(NAME, SIZE)`` for a symbolic dimension."""
    name, sep, size = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        value = int(size)
    except ValueError:
        raise OxQuantError(f"dimension {text!r}: expected NAME=SIZE, e.g. batch=4") from None
    if value < 1:
        raise OxQuantError(f"dimension {text!r}: size must be positive")
    return name, value
