"""ox-quant's native custom-op library (sources in ``custom_ops/``): finding it and
registering it with ONNX Runtime. The op it provides is described, written and decoded by
``ox_quant.formats.custom_matmul``.

Two libraries: ``libox_quant_ops.so`` (CPU kernels) and ``libox_quant_ops_cuda.so`` (the same
CPU kernels plus CUDA kernels). Build them with ``ox-quant build-ops``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ox_quant.errors import OxQuantError

CPU_LIBRARY = "libox_quant_ops.so"
CUDA_LIBRARY = "libox_quant_ops_cuda.so"
ENV_LIB = "OX_QUANT_OPS_LIB"
LIB_DIR = Path(__file__).resolve().parents[1] / "lib"  # ox_quant/lib
BUILD_HINT = "build it with `ox-quant build-ops` (or tools/build_ops.sh), or point OX_QUANT_OPS_LIB at it"

def library_path(provider: str = "cpu") -> Path:
    """Path of the custom-op library for ``provider`` ("cpu" or "cuda").

    Looks at ``$OX_QUANT_OPS_LIB`` first (the library file itself, or a directory holding
    it; for "cuda" the CUDA library beside the named file), then ``ox_quant/lib/``.
    Raises ``OxQuantError`` saying how to build it when it is not there.
    """
    name = CUDA_LIBRARY if provider == "cuda" else CPU_LIBRARY
    candidates: list[Path] = []
    env = os.environ.get(ENV_LIB)
    if env:
        p = Path(env)
        if p.is_dir():
            candidates.append(p / name)
        elif provider == "cuda":
            candidates.append(p.parent / name)
        else:
            candidates.append(p)
    candidates.append(LIB_DIR / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates)
    what = "CUDA custom-op library" if provider == "cuda" else "custom-op library"
    raise OxQuantError(f"the ox-quant {what} ({name}) is not built (looked in {where}): {BUILD_HINT}")


def library_available(provider: str = "cpu") -> bool:
    """True when :func:`library_path` finds the library for ``provider``."""
    try:
        library_path(provider)
    except OxQuantError:
        return False
    return True


def register_library(options, provider: str = "cpu") -> Path:
    """Register the custom-op library with ``onnxruntime.SessionOptions``; return its path.

    For "cuda" only the CUDA library is registered: it holds the CPU kernels as well (so nodes
    that ONNX Runtime places on the CPU still run), and registering both libraries would
    define the ``ox_quant`` domain twice.
    """
    path = library_path(provider)
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # ORT raises its own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OxQuantError(f"ONNX Runtime cannot load {path}: {first}") from exc
    return path


# ----------------------------------------------------------------------------------
# Op inputs
