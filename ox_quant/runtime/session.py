"""ONNX Runtime sessions for models ox-quant reads or writes.

``make_session`` is the one place sessions are created, so that every command
(convert checks, verify, eval, bench) gets the same provider choice, the same
QDQ-fusion accuracy setting and the custom-op library whenever a model needs it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ox_quant.errors import OxQuantError
from ox_quant.formats.custom_matmul import DOMAIN as CUSTOM_DOMAIN
from ox_quant.runtime.ort import load as load_onnxruntime

# Newest ai.onnx opset onnxruntime 1.31 runs (measured); newer ones are probed.
KNOWN_MAX_OPSET = 26

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def available_providers() -> list[str]:
    ort = load_onnxruntime()

    return list(ort.get_available_providers())


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device answers (driver API) *and* ONNX Runtime's CUDA EP starts on it."""
    if PROVIDERS["cuda"] not in available_providers():
        return False
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return False
    from onnx import TensorProto, helper

    ort = load_onnxruntime()

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[PROVIDERS["cuda"], PROVIDERS["cpu"]])
    except Exception:
        return False
    return PROVIDERS["cuda"] in session.get_providers()


@functools.cache
def onnxruntime_supports_opset(opset: int) -> bool:
    """Whether the installed onnxruntime loads ai.onnx opset ``opset`` (probed once above 26)."""
    if opset <= KNOWN_MAX_OPSET:
        return True
    from onnx import TensorProto, helper

    ort = load_onnxruntime()

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception:  # ORT reports an unsupported opset as a generic failure
        return False
    return True


@functools.lru_cache(maxsize=8)
def _graph_facts(path: str, mtime_ns: int, size: int) -> tuple[frozenset[str], dict[str, tuple[str, str]]]:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    domains = {node.domain for node in proto.graph.node}
    for fn in proto.functions:
        domains.update(node.domain for node in fn.node)
    producers = {out: (node.domain, node.op_type) for node in proto.graph.node for out in node.output}
    return frozenset(domains), producers


def graph_facts(model_path: str | os.PathLike) -> tuple[frozenset[str], dict[str, tuple[str, str]]]:
    """``(domains, producers)`` of a model file: the operator domains its nodes use (functions
    included) and, per main-graph node output name, the ``(domain, op_type)`` producing it.
    Parsed once per file version (path, mtime, size): the graph, not the weights, though a
    single-file model's proto holds them, so a session and a decoder share one read."""
    path = Path(model_path).resolve()
    stat = path.stat()
    return _graph_facts(str(path), stat.st_mtime_ns, stat.st_size)


def model_domains(model_path: str | os.PathLike) -> set[str]:
    """Operator domains used by a model's nodes (reads the graph, not the weights)."""
    return set(graph_facts(model_path)[0])


def make_session_options(exact: bool = True, threads: int | None = None):
    """Session options. ``exact=True`` keeps ORT's DQ+MatMul -> MatMulNBits fusion at
    float accuracy (``session.qdq_matmulnbits_accuracy_level = "0"``) instead of its
    default int8-activation path (accuracy_level 4, ~2e-3 relative error)."""
    ort = load_onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(
    model: str | os.PathLike,
    provider: str = "cpu",
    exact: bool = True,
    threads: int | None = None,
    *,
    initializers: Mapping[str, Any] | None = None,
):
    """An ``onnxruntime.InferenceSession`` for ``model`` on ``provider`` ("cpu" or "cuda").

    Registers ox-quant's custom-op library when the model uses the ``ox_quant`` domain.
    ``initializers`` (name -> numpy array) replace the model's initializers of those names
    for this session only (ORT ``add_initializer``; the file is not touched).
    Raises ``OxQuantError`` with a one-line reason when the model cannot be loaded.
    """
    ort = load_onnxruntime()

    path = Path(model)
    if provider not in PROVIDERS:
        raise OxQuantError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if provider == "cuda" and not cuda_available():
        from ox_quant.runtime.ort import cuda_hint

        raise OxQuantError(f"the CUDA execution provider is not available: {cuda_hint()}")
    options = make_session_options(exact=exact, threads=threads)
    kept_values = []
    for name, array in (initializers or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        kept_values.append(value)  # ORT reads them during the session's whole life
    if CUSTOM_DOMAIN in model_domains(path):
        from ox_quant.runtime.custom_ops import register_library

        register_library(options, provider)
    providers: Sequence[str] = [PROVIDERS[provider]]
    if provider == "cuda":
        providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OxQuantError(f"ONNX Runtime cannot load {path.name}: {first}") from exc
    session._ox_quant_kept_initializers = kept_values
    return session


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads (probed once with a
    one-node model, newest first)."""
    import onnx
    ort = load_onnxruntime()
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    options = make_session_options()
    for version in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        probe.ir_version = version
        try:
            ort.InferenceSession(probe.SerializeToString(), sess_options=options, providers=[PROVIDERS["cpu"]])
        except Exception:
            continue
        return version
    raise OxQuantError(f"the installed onnxruntime loads none of the ONNX IR versions 7..{onnx.IR_VERSION}")
