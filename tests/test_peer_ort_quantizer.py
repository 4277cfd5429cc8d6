"""ox-quant against ONNX Runtime's own MatMulNBitsQuantizer (default RTN) on the same model.

Asymmetric: identical bytes (packed codes, scales, zero points). Symmetric: ONNX Runtime
uses a *signed* scale, ``scale = w_ext / -2**(bits-1)`` where ``w_ext`` is the element of
largest magnitude, so ``w_ext`` lands exactly on code 0 and the opposite end saturates at
``2**bits - 1``. ox-quant's ``--symmetric-rule signed`` writes the same bytes; its default
``min-error`` keeps, per block, the lowest-error of a few scales that include that one
(docs/conventions.md), so no block loses more than ONNX Runtime's.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ox_quant.core.config import Block, Format, QuantConfig, SymmetricRule
from ox_quant.core.packing import unpack_matmulnbits
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.inspect import inspect_model
from tests.helpers import matmul_model, random_weights, run

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
    """ONNX Runtime's symmetric RTN rule, written out: codes ``[K, N]``, signed scales ``[nb, N]``.

    ``w_ext = max if |max| > |min| else min``; ``scale = -w_ext / mid``;
    ``q = clip(roundf(w * (1/scale) + mid), 0, qmax)`` in float32, ``roundf`` half away from zero."""
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    k, n = w.shape
    nb = math.ceil(k / block_size)
    codes = np.zeros((k, n), dtype=np.uint8)
    scales = np.zeros((nb, n), dtype=np.float32)
    for b in range(nb):
        for j in range(n):
            block = w[b * block_size:(b + 1) * block_size, j]
            hi, lo = block.max(), block.min()
            ext = hi if abs(hi) > abs(lo) else lo
            scale = np.float32(-ext / np.float32(mid))
            scales[b, j] = scale
            inv = np.float32(1) / scale if scale != 0 else np.float32(0)
            x = (block * inv + np.float32(mid)).astype(np.float64)
            q = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), 0, qmax)
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
    for a, b in zip(theirs[:3], ours[:3], strict=True):
        np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1))
    assert {k: theirs[3][k] for k in ("K", "N", "bits", "block_size")} == {k: ours[3][k] for k in ("K", "N", "bits", "block_size")}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_asymmetric_matches_ort_on_grid_weights_with_exact_ties(tmp_path, bits, dtype):
    """Weights already on a grid (as a dequantized Q4_1 model's are) put ``w / scale + zp``
    and ``-lo / scale`` exactly on halves; ONNX Runtime rounds those away from zero, and so
    must ox-quant to write its bytes. Each block: ``scale = 2**-e``, ``lo = -(z + 1/2) scale``,
    ``hi = lo + qmax scale``, every weight ``lo + j scale`` (dyadic, exact in float16)."""
    rng = np.random.default_rng(3)
    k, n, block = 320, 24, 128
    qmax = (1 << bits) - 1
    w = np.zeros((k, n), dtype=np.float32)
    for b in range(0, k, block):
        for j in range(n):
            scale = 2.0 ** -int(rng.integers(5, 9))
            lo = -(int(rng.integers(0, qmax)) + 0.5) * scale
            rows = min(block, k - b)
            col = lo + scale * rng.integers(0, qmax + 1, rows)
            col[:2] = lo, lo + qmax * scale  # the block's range is exactly [lo, hi]
            w[b:b + rows, j] = col
    src = matmul_model(tmp_path / "grid.onnx", {"W0": w}, dtype=dtype)
    ort_quantize(src, tmp_path / "ort.onnx", bits, block, symmetric=False)
    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=bits, granularity=Block(block), symmetric=False, format=Format.MATMULNBITS)))
    theirs, ours = nbits_arrays(tmp_path / "ort.onnx"), nbits_arrays(tmp_path / "ours.onnx")
    for a, b in zip(theirs[:3], ours[:3], strict=True):
        np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_signed_rule_matches_ort_symmetric_byte_for_byte(model, tmp_path, bits, block_size):
    src, w = model
    ort_quantize(src, tmp_path / "ort.onnx", bits, block_size, symmetric=True)
    packed, scales, zp, attrs = nbits_arrays(tmp_path / "ort.onnx")
    assert zp is None  # both omit zero points: default 2**(bits-1)
    nb = math.ceil(K / block_size)
    # the rule as written out in this file agrees with ONNX Runtime (so it is the rule we copy)
    ref_codes, ref_scales = ort_symmetric_reference(w, bits, block_size)
    np.testing.assert_array_equal(scales.reshape(N, nb).T, ref_scales)
    np.testing.assert_array_equal(unpack_matmulnbits(packed, bits, block_size, K), ref_codes)

    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(
        bits=bits, granularity=Block(block_size), symmetric=True, symmetric_rule=SymmetricRule.SIGNED,
        format=Format.MATMULNBITS)))
    ours = nbits_arrays(tmp_path / "ours.onnx")
    assert ours[2] is None
    assert packed.tobytes() == ours[0].tobytes()
    assert scales.tobytes() == ours[1].tobytes()  # same bytes: [N, nb] there, flat [N*nb] here
    assert {k: attrs[k] for k in ("K", "N", "bits", "block_size")} == {k: ours[3][k] for k in ("K", "N", "bits", "block_size")}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_rule_matches_ort_on_fp16_heavy_tailed_weights(tmp_path, bits):
    w = (np.random.default_rng(1).standard_t(3.0, (K, N)) * 0.05).astype(np.float32)
    src = matmul_model(tmp_path / "m16.onnx", {"W0": w}, dtype=np.float16)
    ort_quantize(src, tmp_path / "ort.onnx", bits, 32, symmetric=True)
    convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(symmetric=True, 
        bits=bits, granularity=Block(32), symmetric_rule=SymmetricRule.SIGNED, format=Format.MATMULNBITS)))
    theirs, ours = nbits_arrays(tmp_path / "ort.onnx"), nbits_arrays(tmp_path / "ours.onnx")
    assert theirs[1].dtype == ours[1].dtype == np.float16
    assert theirs[0].tobytes() == ours[0].tobytes()
    assert theirs[1].tobytes() == ours[1].tobytes()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [32, 128])
def test_default_rule_loses_less_than_ort_symmetric_in_every_block(model, tmp_path, bits, block_size):
    """Decoded from the written models: per block, the squared error of ox-quant's min-error
    rules <= ORT's (min-error-clip strictly less in total)."""
    src, w = model
    ort_quantize(src, tmp_path / "ort.onnx", bits, block_size, symmetric=True)
    nb = math.ceil(K / block_size)

    def block_errors(path):
        packed, scales, _, _ = nbits_arrays(path)
        codes = unpack_matmulnbits(packed, bits, block_size, K).astype(np.float64)
        step = np.repeat(scales.reshape(N, nb).T.astype(np.float64), block_size, axis=0)[:K]
        sq = ((codes - (1 << (bits - 1))) * step - w.astype(np.float64)) ** 2
        return np.add.reduceat(sq, np.arange(0, K, block_size), axis=0)

    theirs = block_errors(tmp_path / "ort.onnx")
    for rule in (SymmetricRule.MIN_ERROR, SymmetricRule.MIN_ERROR_CLIP):
        convert(src, tmp_path / "ours.onnx", ConvertOptions(config=QuantConfig(symmetric=True, 
            bits=bits, granularity=Block(block_size), format=Format.MATMULNBITS, symmetric_rule=rule)))
        ours = block_errors(tmp_path / "ours.onnx")
        assert (ours <= theirs * (1 + 1e-12)).all(), rule
    assert ours.sum() < theirs.sum()


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
