"""Which kernels ONNX Runtime actually runs: the op types of the graph after its optimizer.

ONNX Runtime fuses QDQ patterns (``QuantizeLinear -> DequantizeLinear`` around MatMul, Gemm,
Conv) into its integer kernels while it creates a session; ``SessionOptions.optimized_model_filepath``
makes it write the graph it will run. Large initializers go to a side file, so the graph alone is
read back.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from ox_quant.errors import OxQuantError
from ox_quant.runtime.session import make_session_options

INTEGER_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "DynamicQuantizeMatMul",
                   "MatMulInteger", "ConvInteger", "MatMulNBits")


def optimized_op_types(model: str | os.PathLike, threads: int = 1) -> Counter[str]:
    """Op type -> count in the graph ONNX Runtime's CPU provider runs for ``model`` (all optimizations on)."""
    import onnx

    from ox_quant.runtime.ort import load as load_onnxruntime

    ort = load_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="ox-quant-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = make_session_options(exact=False, threads=threads)
        options.optimized_model_filepath = str(out)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OxQuantError(f"ONNX Runtime cannot load {Path(model).name}: {first}") from exc
        proto = onnx.load(str(out), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


def integer_kernels(ops: Counter[str]) -> dict[str, int]:
    """The integer (fused) kernels among ``ops``, by name."""
    return {op: ops[op] for op in INTEGER_KERNELS if ops.get(op)}
