"""Building the quantized replacement of a weight site in the graph: what every format's
``write`` shares (lazy quantized tensors, names, rewiring; each format's own writer lives in
its module of ``ox_quant.formats``).

The new initializers are ``onnx_ir.LazyTensor``s: a weight is read (memory-mapped),
quantized and packed only when the saver asks for its first tensor, and its large arrays
are dropped once handed out, so peak memory stays near one weight, not the model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ox_quant.algorithms.base import Quantizer, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QuantizedWeight
from ox_quant.errors import OxQuantError
from ox_quant.ir.names import fresh_name
from ox_quant.ir.sites import WeightSite
from ox_quant.ir.validate import MS_DOMAIN

KEEP_BYTES = 1 << 20  # arrays below this size stay cached (small tensors may be read twice)

Packer = Callable[[QuantizedWeight], dict[str, np.ndarray]]
ProgressHook = Callable[[str], None]

SCALE_DTYPES = {
    "FLOAT": (np.float32, ir.DataType.FLOAT),
    "FLOAT16": (np.float16, ir.DataType.FLOAT16),
    "BFLOAT16": (ml_dtypes.bfloat16, ir.DataType.BFLOAT16),
}


def nonfinite_message(name: str, w: np.ndarray, scale_dtype: type) -> str:
    """Why weight ``name`` (``w``, as stored) got a non-finite scale: NaN/Inf values, or a
    range too wide for the scale dtype. Runs only on that error path."""
    bad = ~np.isfinite(w)
    count = int(bad.sum())
    if count:
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return (
            f"weight {name!r} contains {count} NaN/Inf value{'s' if count > 1 else ''} "
            f"(first at {list(where)}); fix the model or skip it with --exclude"
        )
    return (
        f"weight {name!r} spans a range too wide for {np.dtype(scale_dtype).name} scales "
        f"(max |w| = {float(np.abs(w).max()):.3g}); skip it with --exclude"
    )


class LazyQuantizedArrays:
    """The packed arrays of one weight, computed on first request.

    Thread-safe; a large array is released after it is handed out and recomputed only if
    asked for again (the saver asks once).
    """

    def __init__(
        self,
        site: WeightSite,
        config: QuantConfig,
        packer: Packer,
        on_done: ProgressHook | None,
        quantizer: Quantizer,
        stats: SiteStats | None = None,
    ):
        self._site = site
        self._config = config
        self._quantizer = quantizer
        self._stats = stats
        self._packer = packer
        self._on_done = on_done
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._reported = False

    def _compute(self) -> dict[str, np.ndarray]:
        weight = self._site.value.const_value
        assert weight is not None
        w = self._site.normalise(np.asarray(weight.numpy()))
        scale_np, _ = SCALE_DTYPES[self._site.dtype]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported below
            quantized = self._quantizer.quantize(w, self._config, np.dtype(scale_np), self._stats)
        # A NaN or Inf anywhere in a group makes its scale non-finite: checking the scales
        # costs one pass over [groups], not another pass over the weight.
        if not np.isfinite(quantized.scales).all():  # positions are reported as stored
            raise OxQuantError(nonfinite_message(self._site.name, np.asarray(weight.numpy()), scale_np))
        del w
        if isinstance(weight, ir.ExternalTensor):
            weight.release()  # unmap the input's pages: peak memory stays near one weight
        return self._packer(quantized)

    def get(self, key: str) -> np.ndarray:
        with self._lock:
            arrays = self._arrays if self._arrays is not None else self._compute()
            array = arrays[key]
            if array.nbytes >= KEEP_BYTES:
                arrays = {k: v for k, v in arrays.items() if k != key}
            self._arrays = arrays
            if not self._reported and self._on_done is not None:
                self._reported = True
                self._on_done(self._site.name)
            return array

    def tensor(self, key: str, dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.LazyTensor:
        def load() -> ir.Tensor:
            array = self.get(key)
            if dtype == ir.DataType.INT4:
                array = array.astype(ml_dtypes.int4)
            elif dtype == ir.DataType.UINT4:
                array = array.astype(ml_dtypes.uint4)
            return ir.Tensor(array.reshape(shape), dtype=dtype, name=name)

        return ir.LazyTensor(load, dtype, ir.Shape(shape), name=name)


def _initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=  # type: ignore[arg-type]  # stub: a tensor's shape is an ir.Shape
                     ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def stored_nbytes(values: list[ir.Value]) -> int:
    """Bytes the values' tensors occupy on disk (4-bit types packed two per byte)."""
    total = 0
    for v in values:
        tensor = v.const_value
        assert tensor is not None
        total += math.ceil(math.prod(tensor.shape) * tensor.dtype.bitwidth / 8)  # type: ignore[arg-type]  # stub: int dims
    return total


class Writer:
    """Adds the quantized tensors of one site to its graph and rewires its uses."""

    def __init__(
        self,
        site: WeightSite,
        config: QuantConfig,
        used_names: set[str],
        on_done: ProgressHook | None,
        quantizer: Quantizer,
        stats: SiteStats | None = None,
    ):
        self.site = site
        self.config = config
        self.quantizer = quantizer
        self.stats = stats
        self.graph = site.graph
        self.used_names = used_names
        self._on_done = on_done
        self.created: list[ir.Value] = []

    def name(self, suffix: str) -> str:
        return fresh_name(self.used_names, self.site.name + suffix)

    def lazy(self, packer: Packer) -> LazyQuantizedArrays:
        return LazyQuantizedArrays(self.site, self.config, packer, self._on_done, self.quantizer, self.stats)

    def add(self, lazy: LazyQuantizedArrays, key: str, dtype: ir.DataType, shape: tuple[int, ...], suffix: str) -> ir.Value:
        value = _initializer(self.graph, lazy.tensor(key, dtype, shape, self.name(suffix)))
        self.created.append(value)
        return value

    def add_array(self, array: np.ndarray, dtype: ir.DataType, suffix: str) -> ir.Value:
        """A float tensor beside the weight (a Gemm's bias): stored, not counted as weight bytes
        (bits per weight counts codes, scales and zero points)."""
        return _initializer(self.graph, ir.Tensor(array, dtype=dtype, name=self.name(suffix)))

    @property
    def scale_dtype(self) -> ir.DataType:
        return SCALE_DTYPES[self.site.dtype][1]

    def replace_node(self, old: ir.Node, new: ir.Node) -> None:
        ir.convenience.replace_nodes_and_values(old.graph or self.graph, old, [old], [new], old.outputs, new.outputs)

    def finish(self) -> int:
        _drop_if_unused(self.graph, self.site.value)
        return stored_nbytes(self.created)


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.name is not None and value.name in graph.initializers and not value.is_graph_output():
        graph.initializers.pop(value.name)


# ----------------------------------------------------------------------------------
# What the MatMulNBits-like formats share (com.microsoft's and ox-quant's op)


def gemm_bias(node: ir.Node, n: int) -> np.ndarray | None | str:
    """Gemm's ``beta * C`` as a ``[N]`` bias for MatMulNBits; None without C; else why not."""
    alpha = node.attributes.get("alpha")
    if alpha is not None and alpha.as_float() != 1.0:
        return "Gemm has alpha != 1"
    trans_a = node.attributes.get("transA")
    if trans_a is not None and trans_a.as_int():
        return "Gemm has transA=1"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    if c.const_value is None or c.is_graph_input():
        return "Gemm bias is not a constant"
    bias = np.asarray(c.const_value.numpy())
    if bias.size != n or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        return f"Gemm bias has shape {list(bias.shape)}, not [N]"
    beta = node.attributes.get("beta")
    scale = beta.as_float() if beta is not None else 1.0
    return (bias.reshape(n).astype(np.float64) * scale).astype(bias.dtype)


def matmulnbits_blocker(site: WeightSite) -> str | None:
    """Why a site's uses cannot all become MatMulNBits nodes (None when they can).

    Every Gemm can: ``alpha``, ``transA`` and a bias that is not a constant ``[N]`` become
    small nodes around the MatMulNBits (see :func:`_gemm_nodes`)."""
    for use in site.uses:
        if use.kind not in ("matmul", "gemm", "transpose_matmul"):
            return f"{use.op} cannot read a MatMulNBits weight"
    return None


def _write_nbits_nodes(
    w: Writer, packer: Packer, shapes: dict[str, tuple[int, ...]], op_type: str, domain: str, attributes: dict[str, int]
) -> int:
    """Add B/scales/zero points and replace every MatMul/Gemm use by ``domain.op_type``
    with MatMulNBits' input order ``(A, B, scales, zero_points, g_idx, bias)``."""
    lazy = w.lazy(packer)
    dtypes = {"B": ir.DataType.UINT8, "scales": w.scale_dtype, "zero_points": ir.DataType.UINT8}
    suffix = {"B": "_Q", "scales": "_scales", "zero_points": "_zp"}
    inputs = {key: w.add(lazy, key, dtypes[key], shape, suffix[key]) for key, shape in shapes.items()}
    replace_nbits_uses(w, inputs, op_type, domain, attributes)
    return w.finish()


def replace_nbits_uses(
    w: Writer, inputs: dict[str, ir.Value], op_type: str, domain: str, attributes: dict[str, int]
) -> None:
    """Replace each MatMul/Gemm use of ``w.site`` (and each MatMul behind a ``Transpose``
    use, the Transpose then removed) by ``domain.op_type(A, B, scales[, zero_points][, bias])``.
    Gather uses are left to the caller."""
    for use in w.site.uses:
        if use.kind == "transpose_matmul":
            transpose = use.node
            for consumer in list(transpose.outputs[0].uses()):
                _replace_by_nbits(w, consumer.node, "matmul", inputs, op_type, domain, attributes)
            (transpose.graph or w.graph).remove(transpose, safe=True)
        elif use.kind in ("matmul", "gemm"):
            _replace_by_nbits(w, use.node, use.kind, inputs, op_type, domain, attributes)


def _replace_by_nbits(
    w: Writer, node: ir.Node, kind: str, inputs: dict[str, ir.Value], op_type: str, domain: str,
    attributes: dict[str, int],
) -> None:
    new_inputs: list[ir.Value | None] = [node.inputs[0], inputs["B"], inputs["scales"], inputs.get("zero_points")]
    old_bias = node.inputs[2] if kind == "gemm" and len(node.inputs) > 2 else None
    bias = gemm_bias(node, w.site.n) if kind == "gemm" else None
    if isinstance(bias, np.ndarray):
        new_inputs += [None, w.add_array(bias, w.scale_dtype, "_bias")]
    while new_inputs[-1] is None:
        new_inputs.pop()
    prefix = "" if domain == MS_DOMAIN else domain + "_"
    name = fresh_name(w.used_names, f"{node.name or w.site.name}_{prefix}{op_type}")
    if isinstance(bias, str):  # alpha, transA or a bias MatMulNBits cannot take
        nodes = _gemm_nodes(w, node, new_inputs, lambda inputs: ir.node(op_type, inputs, attributes, domain=domain, name=name))
        ir.convenience.replace_nodes_and_values(node.graph or w.graph, node, [node], nodes, node.outputs, nodes[-1].outputs)
        return
    w.replace_node(node, ir.node(op_type, new_inputs, attributes, domain=domain, name=name))
    if old_bias is not None and old_bias.graph is not None:  # replaced by the beta * C copy
        _drop_if_unused(old_bias.graph, old_bias)


def _gemm_nodes(
    w: Writer, gemm: ir.Node, nbits_inputs: list[ir.Value | None], make_nbits: Callable[[list[ir.Value | None]], ir.Node]
) -> list[ir.Node]:
    """``Y = alpha * A' @ W + beta * C`` (``A' = A.T`` when ``transA=1``) as
    ``[Transpose] -> MatMulNBits -> [Mul alpha] -> [Add C or beta * C]``."""
    attrs = gemm.attributes
    alpha = attrs["alpha"].as_float() if "alpha" in attrs else 1.0
    beta = attrs["beta"].as_float() if "beta" in attrs else 1.0
    dtype = SCALE_DTYPES[w.site.dtype][0]
    nodes: list[ir.Node] = []

    def step(op: str, inputs: list[ir.Value | None], **attributes: object) -> ir.Value:
        node = ir.node(op, inputs, attributes, name=w.name(f"_gemm_{op}"))  # type: ignore[arg-type]
        node.outputs[0].name = fresh_name(w.used_names, (node.name or op) + "_out")
        nodes.append(node)
        return node.outputs[0]

    def scalar(value: float, suffix: str) -> ir.Value:
        return _initializer(w.graph, ir.Tensor(np.array(value, dtype=dtype), name=w.name(suffix)))

    if "transA" in attrs and attrs["transA"].as_int():
        nbits_inputs[0] = step("Transpose", [nbits_inputs[0]], perm=[1, 0])
    nbits = make_nbits(nbits_inputs)
    nbits.outputs[0].name = fresh_name(w.used_names, (nbits.name or "MatMulNBits") + "_out")
    nodes.append(nbits)
    y = nbits.outputs[0]
    if alpha != 1.0:
        y = step("Mul", [y, scalar(alpha, "_gemm_alpha")])
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if c is not None:
        if beta != 1.0:
            c = step("Mul", [c, scalar(beta, "_gemm_beta")])
        step("Add", [y, c])
    return nodes


