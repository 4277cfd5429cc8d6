"""Running a model on ONNX Runtime with chosen intermediate tensors exposed: the calibration primitive.

:class:`Observer` builds one ONNX Runtime session over a model with the tensors you name
added as graph outputs, and :meth:`Observer.run` returns them for one feed;
:func:`observe` streams many feeds through it, handing each feed's tensors to a callback,
so that nothing is kept from one feed to the next unless the callback keeps it.

The weights are never read by Python and are loaded once, by ONNX Runtime:

* the session is built from the graph serialized with its large tensors as external-data
  references (external-data files, or the model file itself for embedded weights read in
  place by :mod:`ox_quant.ir.wire`), with ``session.model_external_initializers_file_folder_path``
  naming their folder, so models over 2 GB work;
* ``session.disable_prepacking`` is set, so ONNX Runtime does not keep a second, repacked copy
  of each MatMul weight;
* ``prune=True`` (default) keeps only the nodes the requested tensors depend on (and the
  initializers and inputs those nodes read): the rest of the model is neither loaded nor run;
* ``initializers`` replace weights for this session only (ONNX Runtime ``add_initializer``;
  arrays are handed over without a copy, ``np.memmap`` arrays included; the files are not
  touched). The sequential calibration driver uses this to run a partly quantized model.

Exposed tensors come back as ONNX Runtime computes them (dtype of the model, e.g. float16).
A requested tensor that is a graph input is returned from the feed itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.errors import OxQuantError, one_line
from ox_quant.formats.custom_matmul import DOMAIN as CUSTOM_DOMAIN
from ox_quant.ir.modelio import load_model
from ox_quant.runtime.ort import load as load_onnxruntime
from ox_quant.runtime.session import PROVIDERS, cuda_available, make_session_options

FeedCallback = Callable[[int, Mapping[str, np.ndarray]], None]
"""``on_feed(index, tensors)``: ``index`` counts feeds from 0; ``tensors`` maps each requested name to its array."""


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    found: list[ir.ExternalTensor] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                found.append(value.const_value)
        for node in graph:
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSOR:
                    if isinstance(attr.value, ir.ExternalTensor):
                        found.append(attr.value)
    return found


def _data_folder(model: ir.Model) -> Path | None:
    """The one folder every external-data location of ``model`` is relative to (None: no external data)."""
    folders = {Path(t.base_dir).resolve() for t in _external_tensors(model)}
    if len(folders) > 1:
        raise OxQuantError(
            "the model's weights are in more than one folder (" + ", ".join(sorted(map(str, folders)))
            + "): ONNX Runtime reads external data from one folder; copy them together"
        )
    return folders.pop() if folders else None


def _names_in_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name that the subgraphs of ``node`` mention (outer-scope reads among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names |= _names_in_subgraphs(inner)
    return names


def _prune(graph: onnx.GraphProto, targets: set[str]) -> None:
    """Keep only the nodes, inputs and initializers that ``targets`` depend on; outputs = targets."""
    needed = set(targets)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
            needed |= _names_in_subgraphs(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    kept_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    kept_inputs = [v for v in graph.input if v.name in needed]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.output[:]


class Observer:
    """One ONNX Runtime session over ``model`` that returns the tensors named in ``tensors``.

    ``model``: a path (loaded with :func:`ox_quant.ir.modelio.load_model`: weights memory-mapped,
    never read by Python) or an ``onnx_ir.Model`` loaded that way (e.g. the graph convert is
    about to quantize, after folding). ``tensors``: names of top-level graph values (node outputs
    or graph inputs); ``initializers``: name -> array (the stored shape and dtype) replacing those
    weights in this session; ``prune``: run only what ``tensors`` need (the model's own outputs
    are then not computed). ``provider``: ``"cpu"`` or ``"cuda"``.

    Raises ``OxQuantError`` (one line) for an unknown tensor or initializer name, or a model
    ONNX Runtime cannot load.
    """

    def __init__(
        self,
        model: ir.Model | str | os.PathLike,
        tensors: Sequence[str],
        *,
        initializers: Mapping[str, np.ndarray] | None = None,
        prune: bool = True,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> None:
        if not isinstance(model, ir.Model):
            model = load_model(model)
        self.tensors: tuple[str, ...] = tuple(dict.fromkeys(tensors))
        proto = ir.serde.serialize_model(model)  # external tensors stay references: no weight is read
        graph = proto.graph
        graph_inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
        produced = {out for node in graph.node for out in node.output if out}
        unknown = [t for t in self.tensors if t not in produced and t not in graph_inputs]
        if unknown:
            raise OxQuantError(f"cannot observe {unknown[0]!r}: no node of the model's main graph produces it")
        self._from_feed = tuple(t for t in self.tensors if t in graph_inputs)
        computed = [t for t in self.tensors if t not in graph_inputs]
        existing = {v.name for v in graph.output}
        if prune:
            _prune(graph, set(computed))
            existing = set()
        for name in computed:
            if name not in existing:
                graph.output.append(onnx.ValueInfoProto(name=name))  # ONNX Runtime infers the type
        self._computed = tuple(computed)
        self._overrides: list[Any] = []
        kept_inits = {t.name for t in graph.initializer}
        options = make_session_options(exact=True, threads=threads)
        options.add_session_config_entry("session.disable_prepacking", "1")
        folder = _data_folder(model)
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        ort = load_onnxruntime()
        all_inits = {v.name for g in model.graphs() for v in g.initializers.values()}
        for name, array in (initializers or {}).items():
            if name not in all_inits:
                raise OxQuantError(f"cannot replace initializer {name!r}: the model has none of that name")
            if name not in kept_inits:
                continue  # pruned away: not read by what is observed
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            options.add_initializer(name, value)
            self._overrides.append(value)  # ONNX Runtime reads them for the session's whole life
        if any(node.domain == CUSTOM_DOMAIN for g in model.graphs() for node in g):
            from ox_quant.runtime.custom_ops import register_library

            register_library(options, provider)
        if provider not in PROVIDERS:
            raise OxQuantError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        if provider == "cuda" and not cuda_available():
            raise OxQuantError("the CUDA execution provider is not available")
        providers = [PROVIDERS[provider]] + ([PROVIDERS["cpu"]] if provider == "cuda" else [])
        self._session: Any = None
        self.input_names: tuple[str, ...] = self._from_feed
        """Inputs the (pruned) session reads: a feed needs these, others are ignored."""
        if not computed:
            return  # every requested tensor is a graph input: nothing to run
        data = proto.SerializeToString()
        del proto
        try:
            self._session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises several unrelated types
            raise OxQuantError(f"ONNX Runtime cannot run the model for calibration: {one_line(str(exc))}") from exc
        session_inputs = tuple(i.name for i in self._session.get_inputs())
        self.input_names = session_inputs + tuple(n for n in self._from_feed if n not in session_inputs)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The requested tensors for one feed (graph input name -> array)."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise OxQuantError(f"calibration feed has no array for model input {missing[0]!r}")
        inputs = {name: feed[name] for name in self.input_names}
        try:
            values = self._session.run(list(self._computed), inputs) if self._computed else []
        except Exception as exc:
            raise OxQuantError(f"ONNX Runtime failed on a calibration feed: {one_line(str(exc))}") from exc
        out = dict(zip(self._computed, values, strict=True))
        for name in self._from_feed:
            out[name] = np.asarray(feed[name])
        return {name: out[name] for name in self.tensors}


def observe(
    model: ir.Model | str | os.PathLike,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    on_feed: FeedCallback,
    *,
    initializers: Mapping[str, np.ndarray] | None = None,
    prune: bool = True,
    provider: str = "cpu",
    threads: int | None = None,
) -> int:
    """Stream ``feeds`` through ``model`` with ``tensors`` exposed; ``on_feed(index, tensors)``
    per feed; returns how many feeds ran. One session for all feeds; arguments as :class:`Observer`."""
    observer = Observer(model, tensors, initializers=initializers, prune=prune, provider=provider, threads=threads)
    count = 0
    for index, feed in enumerate(feeds):
        on_feed(index, observer.run(feed))
        count += 1
    return count
