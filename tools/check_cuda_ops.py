#!/usr/bin/env python3
"""Check the CUDA kernels of libox_quant_ops_cuda.so against a float64 numpy reference, on a
GPU machine, without ONNX Runtime: the library's ``OxQuantOpsCudaMatMulHost`` entry point
copies host buffers to the device, runs the kernel and copies Y back.

    python tools/check_cuda_ops.py [--lib PATH]     # exit 0: all cases pass; 1: a case failed;
                                                    # 77: no CUDA device (nothing checked)

Cases: bits 2..8; block sizes 16, 20 (not a power of two), 32, 128 and = K; K not a multiple
of the block size; M = 1, 3, 8 (GEMV kernel) and 9, 64, 130 (tiled kernel); with and without
zero points and bias; channel groups; float32 and float16.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ox_quant.formats.custom_matmul import custom_matmul_initializers  # noqa: E402
from ox_quant.runtime.custom_ops import library_path  # noqa: E402

NO_DEVICE = 77


def load(lib: Path) -> ctypes.CDLL:
    dll = ctypes.CDLL(str(lib))
    f = dll.OxQuantOpsCudaMatMulHost
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [i64, i64, i64, ctypes.c_int, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_char_p, ctypes.c_int]
    f.restype = ctypes.c_int
    dll.OxQuantOpsCudaDeviceCount.restype = ctypes.c_int
    return dll


def cases() -> list[dict]:
    out = []
    for bits in range(2, 9):
        for bs in (16, 20, 32, 128, 200):
            out.append(dict(k=200, n=70, bits=bits, bs=bs, group=1, zp=bs != 32, bias=bits % 2 == 0, dtype=np.float32))
    for group in (4, 70):
        out.append(dict(k=200, n=70, bits=3, bs=200, group=group, zp=True, bias=True, dtype=np.float32))
    for bits in (3, 4, 8):
        out.append(dict(k=256, n=96, bits=bits, bs=64, group=1, zp=True, bias=True, dtype=np.float16))
    out.append(dict(k=2048, n=512, bits=3, bs=32, group=1, zp=True, bias=False, dtype=np.float32))
    return out


def run_case(dll: ctypes.CDLL, c: dict, rng: np.random.Generator) -> list[str]:
    k, n, bits, bs, g, dtype = c["k"], c["n"], c["bits"], c["bs"], c["group"], c["dtype"]
    nb, ng = math.ceil(k / bs), math.ceil(n / g)
    codes = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(0.5, 2.0, (nb, ng)) / 2**bits
    zps = rng.integers(0, 2**bits, (nb, ng)) if c["zp"] else None
    bias = rng.standard_normal(n).astype(dtype) if c["bias"] else None
    w = custom_matmul_initializers(codes, scales, zps, bits, bs, g, dtype=dtype)
    stored = w.scales.astype(np.float64).reshape(ng, nb).T
    zp = np.full((nb, ng), 2 ** (bits - 1), np.float64) if zps is None else zps.astype(np.float64)
    rows, cols = np.arange(k) // bs, np.arange(n) // g
    wref = (codes - zp[rows][:, cols]) * stored[rows][:, cols]
    mag = (codes + zp[rows][:, cols]) * stored[rows][:, cols]
    failures = []
    for m in (1, 3, 8, 9, 64, 130):
        a = rng.standard_normal((m, k)).astype(dtype)
        y = np.zeros((m, n), dtype)
        err = ctypes.create_string_buffer(256)
        rc = dll.OxQuantOpsCudaMatMulHost(m, k, n, bits, bs, g, int(dtype == np.float16), a.ctypes.data, w.B.ctypes.data,
                                          w.scales.ctypes.data, None if w.zero_points is None else w.zero_points.ctypes.data,
                                          None if bias is None else bias.ctypes.data, y.ctypes.data, err, 256)
        name = f"M={m} K={k} N={n} bits={bits} block={bs} G={g} zp={c['zp']} bias={c['bias']} {np.dtype(dtype).name}"
        if rc != 0:
            failures.append(f"{name}: CUDA error {rc}: {err.value.decode()}")
            continue
        a64 = a.astype(np.float64)
        ref = a64 @ wref + (bias.astype(np.float64) if bias is not None else 0.0)
        tol = 1e-5 if dtype == np.float32 else 2e-3
        limit = tol * (np.abs(a64) @ mag) + tol * np.abs(ref) + 1e-6
        bad = np.abs(y.astype(np.float64) - ref) > limit
        if bad.any():
            failures.append(f"{name}: {int(bad.sum())} outputs off, max err {np.abs(y - ref).max():.3g}")
    return failures


def check(lib: Path) -> tuple[int, list[str]]:
    """(number of cases run, failure lines); raises RuntimeError when no CUDA device is usable."""
    dll = load(lib)
    if dll.OxQuantOpsCudaDeviceCount() < 1:
        raise RuntimeError("no CUDA device usable (cudaGetDeviceCount found none, or no driver)")
    rng = np.random.default_rng(0)
    failures: list[str] = []
    all_cases = cases()
    for c in all_cases:
        failures += run_case(dll, c, rng)
    return len(all_cases), failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, default=None, help="libox_quant_ops_cuda.so (default: the built one)")
    args = ap.parse_args()
    lib = args.lib or library_path("cuda")
    try:
        n, failures = check(lib)
    except RuntimeError as exc:
        print(f"SKIP: {exc}")
        return NO_DEVICE
    for line in failures:
        print("FAIL", line)
    print(f"{n} cases x 6 M values: {'all passed' if not failures else f'{len(failures)} failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
