"""Running a model one segment at a time for the sequential driver, caching what later segments read.

Level ``L``'s inputs need only the nodes upstream of them; the nodes an earlier level already
ran need not run again, because every weight upstream of a level-``L`` input has a level below
``L`` (the definition of levels), so a tensor computed for an earlier level was computed with
every weight upstream of it already in its final, quantized state. :class:`Segments` therefore
runs, for each level in increasing order, only the nodes not run before that lead to the
level's inputs (one ONNX Runtime session over that part of the graph, with the quantized
weights overriding the float ones), reading the tensors it needs from earlier segments out of
a cache, and caching those of its own tensors that nodes not yet run still read. Over all
levels each node runs once per feed: the sequential schedule costs about one forward pass
plus a session per level, not a pass per level.

The cache holds, per feed, the tensors crossing from run to not-yet-run nodes, as ``.npy``
files in a scratch folder (read back memory-mapped); a tensor is deleted once no node left to
run reads it. ``peak_bytes`` reports the most it held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ox_quant.calibration.feeds import FeedSource
from ox_quant.calibration.observe import _data_folder, _names_in_subgraphs, session_for
from ox_quant.errors import OxQuantError, one_line
from ox_quant.formats.custom_matmul import DOMAIN as CUSTOM_DOMAIN


class Segments:
    """The main graph of ``model`` run level by level over ``feeds`` (module docstring)."""

    def __init__(self, model: ir.Model, feeds: FeedSource, folder: Path, provider: str = "cpu",
                 threads: int | None = None) -> None:
        self.proto = ir.serde.serialize_model(model)  # weights stay external references
        self.data_folder = _data_folder(model)
        self.custom = any(node.domain == CUSTOM_DOMAIN for g in model.graphs() for node in g)
        self.feeds = feeds
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.provider, self.threads = provider, threads
        graph = self.proto.graph
        self.nodes = list(graph.node)
        self.reads = [set(n.input) - {""} | _names_in_subgraphs(n) for n in self.nodes]
        self.producer = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        self.initializers = {t.name for t in graph.initializer}
        self.graph_inputs = {v.name: v for v in graph.input if v.name not in self.initializers}
        self.done: set[int] = set()
        self.cached: dict[str, tuple[np.dtype, int]] = {}  # name -> (dtype, rank)
        self.sizes: dict[str, int] = {}  # name -> bytes cached over all feeds
        self.ids: dict[str, int] = {}
        self.bytes = 0
        self.peak_bytes = 0

    def _path(self, name: str, index: int) -> Path:
        return self.folder / f"t{self.ids.setdefault(name, len(self.ids))}-{index}.npy"

    def _cone(self, targets: Sequence[str]) -> list[int]:
        """Nodes not run yet that ``targets`` need, in graph order."""
        need, seen = list(targets), set()
        cone: set[int] = set()
        while need:
            name = need.pop()
            if name in seen:
                continue
            seen.add(name)
            i = self.producer.get(name)
            if i is None or i in self.done or i in cone:
                continue
            cone.add(i)
            need.extend(self.reads[i])
        return sorted(cone)

    def _segment(self, cone: list[int], outputs: list[str], overrides: Mapping[str, np.ndarray]) -> tuple[Any, list[Any], list[str]]:
        """A session over the ``cone`` nodes; returns it, its kept values and its fed inputs."""
        produced = {out for i in cone for out in self.nodes[i].output}
        read = set().union(*(self.reads[i] for i in cone)) if cone else set()
        fed = sorted(n for n in read - produced if n not in self.initializers)
        model = onnx.ModelProto()
        model.ir_version = self.proto.ir_version
        model.opset_import.extend(self.proto.opset_import)
        model.functions.extend(self.proto.functions)
        graph = model.graph
        graph.name = self.proto.graph.name
        graph.node.extend(self.nodes[i] for i in cone)
        graph.initializer.extend(t for t in self.proto.graph.initializer if t.name in read)
        graph.sparse_initializer.extend(t for t in self.proto.graph.sparse_initializer if t.name in read)
        for name in fed:
            if name in self.graph_inputs:
                graph.input.append(self.graph_inputs[name])
            elif name in self.cached:
                dtype, rank = self.cached[name]
                elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
                graph.input.append(onnx.helper.make_tensor_value_info(
                    name, elem, [f"{name}_d{axis}" for axis in range(rank)]))
            else:
                raise OxQuantError(f"calibration segment needs {name!r}, which no earlier segment kept")
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        kept_inits = {t.name for t in graph.initializer}
        session, kept = session_for(model, self.data_folder, {k: v for k, v in overrides.items() if k in kept_inits},
                                    self.provider, self.threads, self.custom)
        return session, kept, fed

    def level(self, targets: Sequence[str], overrides: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Per feed, the ``targets`` tensors, computed by the nodes not run before (the earlier
        levels' outputs read from the cache) with ``overrides`` replacing those weights."""
        targets = list(dict.fromkeys(targets))
        cone = self._cone(targets)
        future = [i for i in range(len(self.nodes)) if i not in self.done and i not in cone]
        future_reads = set().union(*(self.reads[i] for i in future)) if future else set()
        produced = [out for i in cone for out in self.nodes[i].output if out]
        keep = [name for name in produced if name in future_reads and name not in self.cached]
        computed = [t for t in targets if t in self.producer and self.producer[t] in cone]
        outputs = list(dict.fromkeys(computed + keep))
        session = kept = None
        fed: list[str] = []
        if outputs:
            session, kept, fed = self._segment(cone, outputs, overrides)
        for index, feed in enumerate(self.feeds):
            inputs: dict[str, Any] = {}
            for name in fed:
                inputs[name] = feed[name] if name in self.graph_inputs else np.load(self._path(name, index), mmap_mode="r")
            values: dict[str, np.ndarray] = {}
            if session is not None:
                try:
                    results = session.run(outputs, inputs)
                except Exception as exc:
                    raise OxQuantError(f"ONNX Runtime failed on a calibration feed: {one_line(str(exc))}") from exc
                values = dict(zip(outputs, results, strict=True))
            for name in keep:
                array = np.asarray(values[name])
                np.save(self._path(name, index), array, allow_pickle=False)
                self.bytes += array.nbytes
                self.sizes[name] = self.sizes.get(name, 0) + array.nbytes
                self.cached[name] = (array.dtype, array.ndim)
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            out = {}
            for t in targets:
                if t in values:
                    out[t] = values[t]
                elif t in self.graph_inputs:
                    out[t] = np.asarray(feed[t])
                elif t in self.cached:
                    out[t] = np.load(self._path(t, index), mmap_mode="r")
                else:
                    raise OxQuantError(f"cannot observe {t!r}: no node of the model's main graph produces it")
            yield out
        del session, kept
        self.done.update(cone)
        self._drop(future_reads)

    def _drop(self, still_read: set[str]) -> None:
        for name in [n for n in self.cached if n not in still_read]:
            for index in range(len(self.feeds)):
                self._path(name, index).unlink(missing_ok=True)
            self.bytes -= self.sizes.pop(name, 0)
            del self.cached[name]
