"""The CUDA library: it must compile wherever nvcc is; its kernels are checked where a GPU is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ox_quant.runtime.build import nvcc_path
from ox_quant.runtime.custom_ops import CUDA_LIBRARY, library_available, library_path
from tests.custom_ops_testlib import check_output, make_case, save_model

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_cuda_ops", ROOT / "tools" / "check_cuda_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_cuda_ops"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> Path:
    """The built CUDA library, or one compiled now (one architecture, to keep it quick)."""
    if library_available("cuda"):
        return library_path("cuda")
    if nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA library cannot be built on this machine")
    from ox_quant.runtime.build import build_ops

    root = tmp_path_factory.mktemp("cuda-ops")
    result = build_ops(cuda=True, build_dir=root / "build", out_dir=root / "lib", cuda_architectures="80")
    return next(p for p in result.libraries if p.name == CUDA_LIBRARY)


def test_cuda_library_builds_and_exports(cuda_library):
    import ctypes

    dll = ctypes.CDLL(str(cuda_library))  # loads without a GPU or libcudart (static runtime)
    for symbol in ("RegisterCustomOps", "OxQuantOpsCudaMatMulHost", "OxQuantOpsCudaDeviceCount"):
        assert hasattr(dll, symbol)


def test_cuda_library_serves_cpu_nodes_in_onnxruntime(cuda_library, tmp_path):
    """Registered in a CPU session, the CUDA library's CPU kernels run (and its CUDA kernel
    registrations do not disturb the schema)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    case = make_case(rng, 100, 37, 5, 32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(cuda_library))
    sess = ort.InferenceSession(str(save_model(case, tmp_path / "m.onnx")), options, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, 100)).astype(np.float32)
    check_output(case, a, sess.run(None, {"A": a})[0])


def test_cuda_kernels_match_reference(cuda_library):
    checker = _load_checker()
    try:
        n, failures = checker.check(cuda_library)
    except RuntimeError as exc:
        pytest.skip(f"CUDA kernels not run: {exc}")
    assert n > 0 and not failures, "\n".join(failures)


def test_cuda_execution_provider_session(cuda_library, tmp_path, monkeypatch):
    from ox_quant.runtime.session import cuda_available, make_session

    if not cuda_available():
        pytest.skip("no usable CUDA execution provider on this machine (no GPU or CUDA runtime)")
    monkeypatch.setenv("OX_QUANT_OPS_LIB", str(cuda_library))
    rng = np.random.default_rng(1)
    for m, dtype in ((1, np.float32), (40, np.float32), (2, np.float16), (70, np.float16)):
        case = make_case(rng, 200, 70, 3, 64, dtype=dtype)
        sess = make_session(save_model(case, tmp_path / "m.onnx"), "cuda")
        a = rng.standard_normal((m, 200)).astype(dtype)
        check_output(case, a, sess.run(None, {"A": a})[0])
