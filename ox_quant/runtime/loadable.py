"""Whether the installed ONNX Runtime accepts a model's graph, checked before converting it.

The structural checks (``ox_quant.ir.validate``) need no ONNX Runtime; these do: the ai.onnx
opset must be one it runs, and a session must build from the graph with the weights left out
(:func:`ox_quant.ir.validate.weightless_copy`), so that a model ONNX Runtime rejects is refused
with its reason before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from ox_quant.errors import OxQuantError, one_line
from ox_quant.formats.custom_matmul import DOMAIN as CUSTOM_DOMAIN
from ox_quant.ir.validate import ONNX_DOMAINS, graphs, tensors, weightless_copy
from ox_quant.runtime.ort import load as load_onnxruntime
from ox_quant.runtime.session import max_ir_version, onnxruntime_supports_opset

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*(Load model from \S+ failed:)?\s*")


def check_opset_runnable(proto: onnx.ModelProto, name: str) -> None:
    """The model's ai.onnx opset is one the installed ONNX Runtime runs."""
    opset = next(entry.version for entry in proto.opset_import if entry.domain in ONNX_DOMAINS)
    if not onnxruntime_supports_opset(opset):
        raise OxQuantError(
            f"{name} uses ai.onnx opset {opset}, which the installed onnxruntime {load_onnxruntime().__version__} "
            "cannot run"
        )


def check_runnable(proto: onnx.ModelProto, path: Path) -> None:
    """ONNX Runtime accepts the graph (ops, attributes, types, domains), weights left out.

    The graph is checked at the IR version a converted model is written with (capped to what
    the installed ONNX Runtime loads).
    """
    ort = load_onnxruntime()
    name = path.name
    check_opset_runnable(proto, name)
    skeleton = weightless_copy(proto, min(proto.ir_version, max_ir_version()))
    folder = path.parent.resolve()
    # Embedded tensors left in the file (``ox_quant.ir.wire``) name the model file itself: read
    # them from the file it resolves to (ONNX Runtime refuses external data reached through a
    # symbolic link).
    in_place = [entry for tensor in tensors(skeleton) for entry in tensor.external_data
                if entry.key == "location" and entry.value == path.name]
    if in_place:
        real = path.resolve()
        folder = real.parent
        for entry in in_place:
            entry.value = real.name
    options = ort.SessionOptions()
    # subgraphs keep their (small) initializers; external ones are found beside the model
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if any(node.domain == CUSTOM_DOMAIN for g in graphs(proto.graph) for node in g.node):
        from ox_quant.runtime.custom_ops import register_library

        register_library(options, "cpu")  # raises, saying how to build it, when it is missing
    data = skeleton.SerializeToString()
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

    try:
        ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except NoKernel:
        # The graph loaded and resolved; only the CPU EP lacks a kernel (e.g. bfloat16 MatMul).
        # Another EP may run it, so this is not a fault of the model.
        return
    except Exception as exc:  # ORT reports every load failure as one of a few generic types
        reason = _ORT_PREFIX.sub("", one_line(str(exc), limit=1000))
        raise OxQuantError(f"ONNX Runtime {ort.__version__} rejects {name}: {one_line(reason)}") from exc
