"""Building the quantized replacement of a weight site in the graph.

The new initializers are ``onnx_ir.LazyTensor``s: a weight is read (memory-mapped),
quantized and packed only when the saver asks for its first tensor, and its large arrays
are dropped once handed out, so peak memory stays near one weight, not the model.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ox_quant.config import Block, ChannelGroup, PerChannel, PerTensor, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.packing import pack_matmulnbits, pack_zero_points
from ox_quant.quantize import QuantizedWeight, quantize
from ox_quant.sites import WeightSite

MS_DOMAIN = "com.microsoft"
KEEP_BYTES = 1 << 20  # arrays below this size stay cached (small tensors may be read twice)

Packer = Callable[[QuantizedWeight], dict[str, np.ndarray]]
ProgressHook = Callable[[str], None]

SCALE_DTYPES = {"FLOAT": (np.float32, ir.DataType.FLOAT), "FLOAT16": (np.float16, ir.DataType.FLOAT16)}


def nonfinite_message(name: str, w: np.ndarray, scale_dtype: type) -> str:
    """Why weight ``name`` has a non-finite scale: NaN/Inf values, or a range too wide."""
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

    def __init__(self, site: WeightSite, config: QuantConfig, packer: Packer, on_done: ProgressHook | None):
        self._site = site
        self._config = config
        self._packer = packer
        self._on_done = on_done
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._reported = False

    def _compute(self) -> dict[str, np.ndarray]:
        weight = self._site.value.const_value
        assert weight is not None
        w = np.asarray(weight.numpy()).reshape(self._site.k, self._site.n)
        scale_np, _ = SCALE_DTYPES[self._site.dtype]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported below
            quantized = quantize(w, self._config, scale_dtype=scale_np)
        # A NaN or Inf anywhere in a group makes its scale non-finite: checking the scales
        # costs one pass over [groups], not another pass over the weight.
        if not np.isfinite(quantized.scales).all():
            raise OxQuantError(nonfinite_message(self._site.name, w, scale_np))
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


def _fresh_name(graph: ir.Graph, used: set[str], base: str) -> str:
    name = base
    i = 1
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


def _initializer(graph: ir.Graph, tensor: ir.LazyTensor) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
        graph.initializers.pop(value.name)


# ----------------------------------------------------------------------------------
# MatMulNBits


def matmulnbits_shapes(k: int, n: int, config: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Input shapes of MatMulNBits: B ``[N, nb, blob]``, scales ``[N*nb]``, zero points."""
    assert isinstance(config.granularity, Block)
    bs = config.granularity.size
    nb = math.ceil(k / bs)
    shapes = {"B": (n, nb, math.ceil(bs * config.bits / 8)), "scales": (n * nb,)}
    if not config.symmetric:
        shapes["zero_points"] = (n * math.ceil(nb * config.bits / 8),)
    return shapes


def pack_for_matmulnbits(config: QuantConfig) -> Packer:
    """Codes/scales/zero points ``[nb, N]`` -> MatMulNBits inputs (N-major)."""
    assert isinstance(config.granularity, Block)
    bs = config.granularity.size

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        out = {
            "B": pack_matmulnbits(q.codes, q.bits, bs, pad_code=0),
            "scales": np.ascontiguousarray(q.scales.T).reshape(-1),
        }
        if not q.symmetric:
            out["zero_points"] = pack_zero_points(q.zero_points, q.bits)
        return out

    return packer


def write_matmulnbits(
    graph: ir.Graph, site: WeightSite, config: QuantConfig, used_names: set[str], on_done: ProgressHook | None
) -> None:
    """Replace each ``MatMul(A, W)`` of ``site`` by ``com.microsoft.MatMulNBits``."""
    assert isinstance(config.granularity, Block)
    lazy = LazyQuantizedArrays(site, config, pack_for_matmulnbits(config), on_done)
    _, scale_ir = SCALE_DTYPES[site.dtype]
    dtypes = {"B": ir.DataType.UINT8, "scales": scale_ir, "zero_points": ir.DataType.UINT8}
    suffix = {"B": "_Q", "scales": "_scales", "zero_points": "_zp"}
    inputs = {
        key: _initializer(graph, lazy.tensor(key, dtypes[key], shape, _fresh_name(graph, used_names, site.name + suffix[key])))
        for key, shape in matmulnbits_shapes(site.k, site.n, config).items()
    }
    attributes: dict[str, int] = {
        "K": site.k,
        "N": site.n,
        "bits": config.bits,
        "block_size": config.granularity.size,
    }
    if config.accuracy_level is not None:
        attributes["accuracy_level"] = config.accuracy_level
    for node, _ in site.consumers:
        new_inputs = [node.inputs[0], inputs["B"], inputs["scales"]]
        if "zero_points" in inputs:
            new_inputs.append(inputs["zero_points"])
        name = _fresh_name(graph, used_names, (node.name or site.name) + "_MatMulNBits")
        new = ir.node("MatMulNBits", new_inputs, attributes, domain=MS_DOMAIN, name=name)
        new.outputs[0].name = None  # replaced below by the old output's name
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
    _drop_if_unused(graph, site.value)


# ----------------------------------------------------------------------------------
# DequantizeLinear (QDQ)


def qdq_layout(k: int, n: int, config: QuantConfig) -> tuple[dict[str, int], tuple[int, ...]]:
    """DequantizeLinear attributes and the scale/zero-point shape for ``W[K, N]``."""
    g = config.granularity
    if isinstance(g, PerTensor):
        return {}, ()
    if isinstance(g, (PerChannel, ChannelGroup)):
        return {"axis": 1}, (n,)
    if isinstance(g, Block):
        return {"axis": 0, "block_size": g.size}, (math.ceil(k / g.size), n)
    raise TypeError(g)


def qdq_dtype(config: QuantConfig) -> ir.DataType:
    """INT4/INT8 (symmetric: codes - mid, zero point 0) or UINT4/UINT8 (asymmetric)."""
    if config.bits == 4:
        return ir.DataType.INT4 if config.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if config.symmetric else ir.DataType.UINT8


def pack_for_qdq(config: QuantConfig, k: int, n: int) -> Packer:
    _, param_shape = qdq_layout(k, n, config)

    def per_axis(a: np.ndarray, q: QuantizedWeight) -> np.ndarray:
        if isinstance(q.granularity, ChannelGroup):  # one value per channel, repeated G times
            a = np.repeat(a[0], q.granularity.size)[:n]
        return a.reshape(param_shape)

    def packer(q: QuantizedWeight) -> dict[str, np.ndarray]:
        if q.symmetric:
            codes = (q.codes.astype(np.int16) - config.mid).astype(np.int8)
            return {"q": codes, "scale": per_axis(q.scales, q)}
        return {"q": q.codes, "scale": per_axis(q.scales, q), "zero_point": per_axis(q.zero_points, q)}

    return packer


def write_qdq(
    graph: ir.Graph, site: WeightSite, config: QuantConfig, used_names: set[str], on_done: ProgressHook | None
) -> None:
    """Replace ``W`` by ``DequantizeLinear(W_q, scale[, zero_point])`` feeding its consumers."""
    attributes, param_shape = qdq_layout(site.k, site.n, config)
    lazy = LazyQuantizedArrays(site, config, pack_for_qdq(config, site.k, site.n), on_done)
    _, scale_ir = SCALE_DTYPES[site.dtype]
    q_dtype = qdq_dtype(config)
    q_value = _initializer(graph, lazy.tensor("q", q_dtype, (site.k, site.n), _fresh_name(graph, used_names, site.name + "_Q")))
    s_value = _initializer(graph, lazy.tensor("scale", scale_ir, param_shape, _fresh_name(graph, used_names, site.name + "_scale")))
    inputs = [q_value, s_value]
    if not config.symmetric:
        inputs.append(
            _initializer(graph, lazy.tensor("zero_point", q_dtype, param_shape, _fresh_name(graph, used_names, site.name + "_zp")))
        )
    meta = {"ox_quant.granularity": str(config.granularity), "ox_quant.bits": str(config.bits)}
    name = _fresh_name(graph, used_names, site.name + "_DequantizeLinear")
    dq = ir.node("DequantizeLinear", inputs, attributes, name=name, metadata_props=meta)
    dq.outputs[0].name = _fresh_name(graph, used_names, site.name + "_dq")
    dq.outputs[0].dtype = site.value.dtype
    dq.outputs[0].shape = ir.Shape([site.k, site.n])
    graph.insert_before(graph.node(0), dq)
    for node, index in site.consumers:
        node.replace_input_with(index, dq.outputs[0])
    _drop_if_unused(graph, site.value)
