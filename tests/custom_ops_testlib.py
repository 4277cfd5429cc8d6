"""Shared helpers for the custom-op tests: the library fixture, one-node models, and an
independent float64 reference (built from codes/scales/zero points, not from packed bytes)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.formats.custom_matmul import CustomMatMulWeights, custom_matmul_initializers, make_custom_matmul_node

IR_VERSION = 10  # loadable by the installed onnxruntime


def ensure_cpu_library(tmp_root: Path) -> Path:
    """The CPU library: the built one, or one built now into ``tmp_root``; skip if impossible."""
    from ox_quant.errors import OxQuantError
    from ox_quant.runtime.custom_ops import library_path

    try:
        return library_path("cpu")
    except OxQuantError:
        pass
    from ox_quant.runtime.build import build_ops

    try:
        result = build_ops(cuda=False, build_dir=tmp_root / "build", out_dir=tmp_root / "lib")
    except OxQuantError as exc:
        pytest.skip(f"custom-op library not built and cannot be built here: {exc}")
    os.environ["OX_QUANT_OPS_LIB"] = str(result.libraries[0])
    return result.libraries[0]


@dataclass
class Case:
    """One quantized weight: codes [K, N], scales/zero points [n_blocks, n_groups], bias [N]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bias: np.ndarray | None
    bits: int
    block_size: int
    group: int
    dtype: type
    weights: CustomMatMulWeights

    @property
    def k(self) -> int:
        return self.codes.shape[0]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    def reference_w(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, |codes|+|zp| scaled) in float64 [K, N], from the unpacked inputs and the
        scales as stored (in the activation dtype)."""
        k, n = self.codes.shape
        nb, ng = math.ceil(k / self.block_size), math.ceil(n / self.group)
        stored = self.weights.scales.astype(np.float64).reshape(ng, nb).T
        zp = np.full((nb, ng), 2 ** (self.bits - 1), np.float64) if self.zero_points is None else self.zero_points.astype(np.float64)
        rows, cols = np.arange(k) // self.block_size, np.arange(n) // self.group
        s, z = stored[rows][:, cols], zp[rows][:, cols]
        return (self.codes - z) * s, (self.codes + z) * np.abs(s)


def make_case(rng: np.random.Generator, k: int, n: int, bits: int, block_size: int, group: int = 1,
              zero_points: bool = True, bias: bool = True, dtype: type = np.float32) -> Case:
    nb, ng = math.ceil(k / block_size), math.ceil(n / group)
    codes = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(0.5, 2.0, (nb, ng)) / 2**bits
    zps = rng.integers(0, 2**bits, (nb, ng)) if zero_points else None
    b = rng.standard_normal(n).astype(dtype) if bias else None
    weights = custom_matmul_initializers(codes, scales, zps, bits, block_size, group, dtype=dtype)
    return Case(codes, scales, zps, b, bits, block_size, group, dtype, weights)


def save_model(case: Case, path: Path, rank: int = 2, accuracy_level: int | None = None) -> Path:
    elem = TensorProto.FLOAT if case.dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(v, key) for key, v in case.weights.inputs.items()]
    if case.bias is not None:
        inits.append(numpy_helper.from_array(case.bias, "bias"))
    node = make_custom_matmul_node("A", "Y", {key: key for key in case.weights.inputs}, case.weights.attributes,
                                   bias="bias" if case.bias is not None else None, name="qmm",
                                   accuracy_level=accuracy_level)
    lead = [f"d{i}" for i in range(rank - 1)]
    graph = helper.make_graph([node], "custom_matmul", [helper.make_tensor_value_info("A", elem, [*lead, case.k])],
                              [helper.make_tensor_value_info("Y", elem, [*lead, case.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ox_quant", 1)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def check_output(case: Case, a: np.ndarray, y: np.ndarray) -> None:
    """Y against the float64 reference, with a tolerance from the dtype's rounding:
    |err| <= tol * (|A| @ ((codes + zp) * |scale|)) + tol * |ref| + floor."""
    w, mag = case.reference_w()
    a64 = a.astype(np.float64).reshape(-1, case.k)
    ref = a64 @ w + (case.bias.astype(np.float64) if case.bias is not None else 0.0)
    bound = np.abs(a64) @ mag
    tol = 1e-5 if case.dtype == np.float32 else 2e-3
    got = y.astype(np.float64).reshape(-1, case.n)
    assert y.dtype == case.dtype
    assert y.shape == (*a.shape[:-1], case.n)
    err = np.abs(got - ref)
    limit = tol * bound + tol * np.abs(ref) + 1e-6
    worst = np.unravel_index(np.argmax(err / limit), err.shape)
    assert np.all(err <= limit), f"max err {err[worst]:.3g} > {limit[worst]:.3g} at {worst} (ref {ref[worst]:.4g})"


def int8_activation_reference(case: Case, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """accuracy_level 4 modelled exactly: (reference Y from the int8-rounded A, its magnitude
    bound |A_hat| @ ((codes + zp) * |scale|), A_hat) in float64, [rows, N]."""
    from ox_quant.formats.custom_matmul import quantize_activations_int8

    a2 = a.reshape(-1, case.k)
    qa, scale = quantize_activations_int8(a2, case.block_size)
    a_hat = qa.astype(np.float64) * np.repeat(scale.astype(np.float64), case.block_size, axis=1)[:, :case.k]
    w, mag = case.reference_w()
    ref = a_hat @ w + (case.bias.astype(np.float64) if case.bias is not None else 0.0)
    return ref, np.abs(a_hat) @ mag, a_hat


def check_int8_output(case: Case, a: np.ndarray, y: np.ndarray, tol: float = 1e-5) -> None:
    """Y of an accuracy_level=4 node against the float64 reference computed with A rounded to int8
    exactly as the op does (so only float32 accumulation error remains): tolerance as check_output
    (1e-5 relative for float32 Y; float16 Y adds its own rounding, 2e-3)."""
    ref, bound, _ = int8_activation_reference(case, a)
    tol = tol if case.dtype == np.float32 else 2e-3
    got = y.astype(np.float64).reshape(-1, case.n)
    assert y.dtype == case.dtype and y.shape == (*a.shape[:-1], case.n)
    err = np.abs(got - ref)
    limit = tol * bound + tol * np.abs(ref) + 1e-6
    worst = np.unravel_index(np.argmax(err / limit), err.shape)
    assert np.all(err <= limit), f"max err {err[worst]:.3g} > {limit[worst]:.3g} at {worst} (ref {ref[worst]:.4g})"
