"""The peer row of a study: ONNX Runtime's own ``MatMulNBitsQuantizer`` on the same configuration.

Run in-process through its Python API (default RTN algorithm, MatMul weights only, as it ships).
What it can express: 2, 4 or 8 bits with blocks along K whose size is a power of two >= 16
(QOperator: ``com.microsoft.MatMulNBits``), and 4-bit per-channel as QDQ
(``channel_wised_quantize``). Everything else is a ``not supported`` row with the reason.
Its symmetric mode uses a signed scale that reaches all ``2**bits`` levels (docs/conventions.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ox_quant.core.config import DEFAULT_BLOCK_SIZE, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats.matmulnbits import MIN_BLOCK_SIZE, valid_block_size
from ox_quant.study.measure import layout_of, measure_row, remove_model, scale_bytes
from ox_quant.study.rows import PEER, Row, config_label

PEER_BITS = (2, 4, 8)
PEER_NAME = "MatMulNBitsQuantizer"


def peer_arguments(config: QuantConfig) -> dict[str, Any] | str:
    """Keyword arguments of ``MatMulNBitsQuantizer`` for ``config``, or why it cannot express it."""
    g = config.granularity
    if g.k_block is not None:
        if config.bits not in PEER_BITS:
            return f"not supported by {PEER_NAME} (it takes 2, 4 or 8 bits, not {config.bits})"
        if not valid_block_size(g.k_block):
            return f"not supported by {PEER_NAME} (block size must be a power of two >= {MIN_BLOCK_SIZE}, not {g.k_block})"
        return {"bits": config.bits, "block_size": g.k_block, "is_symmetric": config.symmetric, "quant_format": "QOperator"}
    if g.per_channel:
        if config.bits != 4:
            return f"not supported by {PEER_NAME} (per-channel only as 4-bit QDQ with channel_wised_quantize, not {config.bits}-bit)"
        return {"bits": 4, "block_size": DEFAULT_BLOCK_SIZE, "is_symmetric": config.symmetric, "quant_format": "QDQ",
                "channel_wised_quantize": True}
    return f"not supported by {PEER_NAME} (it has no {g.name} scales, only blocks along K and 4-bit per-channel)"


def quantize_with_peer(src: Path, dst: Path, arguments: dict[str, Any]) -> None:
    """Run ``MatMulNBitsQuantizer`` on ``src`` and save its model to ``dst``."""
    import onnx

    from ox_quant.runtime.ort import load as load_onnxruntime

    load_onnxruntime()  # one line on a missing or broken ONNX Runtime, before its submodules
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    kwargs = dict(arguments)
    kwargs["quant_format"] = getattr(QuantFormat, kwargs["quant_format"])
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), **kwargs)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst))


def run_peer(config: QuantConfig, src: Path, work: Path, keep: bool, scorer: Any, fp32_value: float | None) -> Row:
    """The peer row for ``config`` (a ``Row``): quantize, time, inspect and score."""

    label = config_label(config)
    base: dict[str, Any] = {"tool": PEER, "label": label, "bits": config.bits,
                            "granularity": str(config.granularity), "symmetric": config.symmetric}
    arguments = peer_arguments(config)
    if isinstance(arguments, str):
        return Row(**base, status="not supported", reason=arguments)
    out = work / f"{src.stem}.{label.replace(' ', '.').replace(':', '')}.ort.onnx"
    start = time.perf_counter()
    try:
        quantize_with_peer(src, out, arguments)
    except Exception as exc:  # the peer raises assorted types (AssertionError, ValueError, ...)
        return Row(**base, status="refused", reason=f"{PEER_NAME} raised {type(exc).__name__}: {exc}".strip(),
                   convert_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    try:
        from ox_quant.pipeline.inspect import inspect_model

        info = inspect_model(out)
        if not info.quantized:
            return Row(**base, status="not supported", convert_seconds=seconds,
                       reason=f"{PEER_NAME} quantized no weight (it handles MatMul weights only)")
        scales, count, numel = scale_bytes(out)
        if arguments.get("channel_wised_quantize"):  # DequantizeLinear(axis=1, block_size=K) on W^T, then Transpose
            layout = f"MatMul: qdq channel x{count} (channel_wised_quantize)"
        else:
            layout = layout_of([("MatMul", q.format, f"{q.granularity}:{q.block_size}") for q in info.quantized])
        row = measure_row(base, scorer, out, fp32_value)
        return Row(**{**row.as_dict(), "bits_per_weight": info.bits_per_weight, "scale_bytes": scales,
                      "weights_quantized": count, "params_quantized": numel, "layout": layout,
                      "convert_seconds": seconds})
    except OxQuantError as exc:
        return Row(**base, status="failed", reason=str(exc), convert_seconds=seconds)
    finally:
        if not keep:
            remove_model(out)
