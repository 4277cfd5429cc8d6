"""ox-quant against ONNX Runtime's own MatMulNBitsQuantizer (default RTN) on the same model.

Asymmetric: identical bytes (packed codes, scales, zero points). Symmetric: ONNX Runtime
uses a *signed* scale, ``scale = w_ext / -2**(bits-1)`` where ``w_ext`` is the element of
largest magnitude, so ``w_ext`` lands exactly on code 0 and the opposite end saturates at
``2**bits - 1``; ox-quant uses ``scale = absmax / (2**(bits-1) - 1)`` and never clips
(see docs/conventions.md). The test reproduces ONNX Runtime's rule exactly, so every
difference is accounted for.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers import matmul_model, random_weights, run
from ox_quant.core.config import Block, Format, QuantConfig
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.inspect import inspect_model
from ox_quant.core.packing import unpack_matmulnbits

K, N = 200, 64  # K not a multiple of the block sizes below


def ort_quantize(src, dst, bits, block_size, symmetric, quant_format="QOperator"):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=symmetric,
        quant_format=getattr(QuantFormat, quant_format),
    )
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst))


def nbits_arrays(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return inits[node.input[1]], inits[node.input[2]], zp, attrs


def ort_symmetric_reference(w: np.ndarray, bits: int, block_size: int):
    """ONNX Runtime's symmetric RTN rule, written out: codes ``[K, N]``, signed scales ``[nb, N]``."""
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    k, n = w.shape
    nb = math.ceil(k / block_size)
    codes = np.zeros((k, n), dtype=np.uint8)
    scales = np.zeros((nb, n), dtype=np.float32)
    for b in range(nb):
        for j in range(n):
            block = w[b * block_size:(b + 1) * block_size, j]
            ext = block[np.argmax(np.abs(block))]
            scale = np.float32(ext / np.float32(-mid))
            scales[b, j] = scale
            inv = np.float32(1) / scale if scale != 0 else np.float32(0)
            q = np.clip(np.round(block * inv) + mid, 0, qmax)
            codes[b * block_size:(b + 1) * block_size, j] = q
    return codes, scales


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    weights = random_weights(np.random.default_rng(7), K, N)
    return matmul_model(tmp_path_factory.mktemp("peer") / "m.onnx", weights), weights["W0"]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_asymmetric_matches_ort_byte_for_byte(model, tmp_path, bits, block_size):
    src, _ = model
    ort_quantize(src, tmp_path / "ort.onnx", bits, block_size, symmetric=False)
    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=bits, granularity=Block(block_size), symmetric=False, format=Format.MATMULNBITS)))
    theirs, ours = nbits_arrays(tmp_path / "ort.onnx"), nbits_arrays(tmp_path / "ours.onnx")
    # same bytes; ONNX Runtime stores scales/zero points as [N, nb], ox-quant flat [N*nb]
    for a, b in zip(theirs[:3], ours[:3]):
        np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1))
    assert {k: theirs[3][k] for k in ("K", "N", "bits", "block_size")} == {k: ours[3][k] for k in ("K", "N", "bits", "block_size")}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 128])
def test_symmetric_difference_is_exactly_the_signed_scale_convention(model, tmp_path, bits, block_size):
    src, w = model
    ort_quantize(src, tmp_path / "ort.onnx", bits, block_size, symmetric=True)
    packed, scales, zp, _ = nbits_arrays(tmp_path / "ort.onnx")
    assert zp is None  # both omit zero points: default 2**(bits-1)
    nb = math.ceil(K / block_size)
    codes = unpack_matmulnbits(packed, bits, block_size, K)
    ref_codes, ref_scales = ort_symmetric_reference(w, bits, block_size)
    np.testing.assert_allclose(scales.reshape(N, nb).T, ref_scales, rtol=1e-6)
    # identical codes except where rounding of w * (1/scale) vs w / scale differs at a tie
    assert (codes == ref_codes).mean() > 0.999

    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=bits, granularity=Block(block_size), symmetric=True, format=Format.MATMULNBITS)))
    our_scales = nbits_arrays(tmp_path / "ours.onnx")[1].reshape(N, nb).T
    # ours: absmax / (mid - 1), always positive; theirs: |w_ext| / mid with a sign
    absmax = np.abs(ref_scales) * (1 << (bits - 1))
    np.testing.assert_allclose(our_scales, absmax / ((1 << (bits - 1)) - 1), rtol=1e-6)


def test_both_outputs_run_and_inspect_reads_ort_models(model, tmp_path):
    src, _ = model
    ort_quantize(src, tmp_path / "ort.onnx", 4, 32, symmetric=False)
    info = inspect_model(tmp_path / "ort.onnx")
    (q,) = info.quantized
    assert (q.format, q.bits, q.granularity, q.block_size, q.symmetric, q.shape) == (
        "matmulnbits", 4, "block", 32, False, (K, N))
    ours = convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=4, granularity=Block(32), symmetric=False)))
    assert q.stored_bytes == ours.quantized[0].stored_bytes
    x = np.random.default_rng(0).standard_normal((2, 3, K)).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "ort.onnx", {"x": x})[0], run(tmp_path / "ours.onnx", {"x": x})[0])


def test_ort_qdq_format_matches_ox_quant_qdq(model, tmp_path):
    """ONNX Runtime's QDQ output (4-bit blocks along K, asymmetric) dequantizes to ours."""
    src, w = model
    ort_quantize(src, tmp_path / "ort.onnx", 4, 32, symmetric=False, quant_format="QDQ")
    info = inspect_model(tmp_path / "ort.onnx")
    (q,) = info.quantized
    assert (q.format, q.bits, q.granularity, q.block_size) == ("qdq", 4, "block", 32)
    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=4, granularity=Block(32), symmetric=False, format=Format.QDQ)))
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    np.testing.assert_allclose(run(tmp_path / "ort.onnx", {"x": x})[0], run(tmp_path / "ours.onnx", {"x": x})[0],
                               rtol=1e-6, atol=1e-6)
