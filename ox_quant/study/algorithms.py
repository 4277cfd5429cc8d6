"""Algorithm rows of a study: ox-quant's quantizers and ONNX Runtime's methods, side by side.

For each configuration, one row per ox-quant algorithm (``ox_quant.algorithms.registry``;
those that read calibration statistics get the study's calibration feeds) and one per
``MatMulNBitsQuantizer`` method (``default``, ``rtn``, ``hqq``, ``k_quant``, ``gptq`` with a
``CalibrationDataReader`` over the same feeds, ``nvidia_awq``). Every conversion runs in its
own spawned process (``ox_quant.study.child``), so each row carries the tool's wall time and
peak resident memory. A method that cannot express a configuration, or cannot run here, is a
row with the reason. The functions named ``*_in_child`` are what the child runs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.core.config import QuantConfig
from ox_quant.study.child import ChildError, measured
from ox_quant.study.measure import Scorer, layout_of, measure_row, remove_model, scale_bytes
from ox_quant.study.rows import OX_QUANT, PEER, Row, StudyOptions, config_label

PEER_METHODS = ("default", "rtn", "hqq", "k_quant", "gptq", "nvidia_awq")
PEER_BITS = {"default": (2, 4, 8), "rtn": (2, 4, 8), "hqq": (2, 4, 8), "k_quant": (2, 4, 8), "gptq": (2, 4, 8),
             "nvidia_awq": (4,)}
"""Bits each method accepts (``MatMulNBitsQuantizer`` asserts 2, 4 or 8; its MatMulNBits kernels)."""

Feeds = list[dict[str, np.ndarray]]


def needs_calibration(algorithm: str) -> bool:
    """Whether ox-quant's ``algorithm`` reads calibration statistics."""
    from ox_quant.algorithms.base import Needs
    from ox_quant.algorithms.registry import get_quantizer

    return get_quantizer(algorithm).needs is not Needs.NONE


# ---------------------------------------------------------------------------- in the child


def convert_in_child(src: str, out: str, config: QuantConfig, include_ops: tuple[str, ...],
                     feeds: Feeds | None, description: str) -> dict[str, Any]:
    """ox-quant's ``convert`` of ``src`` under ``config`` (calibrated on ``feeds`` when given);
    a summary of its report."""
    from ox_quant.calibration.feeds import FeedSource
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.pipeline.policy import UNIFORM
    from ox_quant.pipeline.selection import Selection

    data = FeedSource(description, len(feeds), lambda: iter(feeds)) if feeds else None
    report = convert(Path(src), Path(out), ConvertOptions(config=config, selection=Selection(include_ops=include_ops),
                                                          policy=UNIFORM, calibration_data=data))
    return {
        "quantized": len(report.quantized),
        "params": sum(q.shape[0] * q.shape[1] for q in report.quantized),
        "bits_per_weight": report.bits_per_weight,
        "layout": layout_of([(q.op, q.format, q.granularity + (f":{q.block_size}" if q.granularity in
                                                                ("block", "channel-group") else ""))
                             for q in report.quantized]),
        "skipped": sorted(Counter(s.reason for s in report.skipped).items()),
        "skip_reasons": sorted({s.reason for s in report.skipped}),
    }


def peer_in_child(src: str, out: str, method: str, bits: int, block: int, symmetric: bool, feeds: Feeds | None) -> None:
    """``MatMulNBitsQuantizer`` with ``method``'s config; the model saved to ``out``."""
    import onnx

    from ox_quant.runtime.ort import load as load_onnxruntime

    load_onnxruntime()
    from onnxruntime.quantization import matmul_nbits_quantizer as m
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The study's calibration feeds, one per ``get_next``."""

        def __init__(self, items: Feeds) -> None:
            self.items, self.i = items, 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(self.items):
                return None
            self.i += 1
            return self.items[self.i - 1]

        def rewind(self) -> None:
            self.i = 0

    config: Any
    if method == "default":
        config = m.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    elif method == "rtn":
        config = m.RTNWeightOnlyQuantConfig()
    elif method == "k_quant":
        config = m.KQuantWeightOnlyQuantConfig()
    elif method == "hqq":
        config = m.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif method == "gptq":
        config = m.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(feeds or []))
    elif method == "nvidia_awq":
        import modelopt.onnx.quantization.int4  # noqa: F401  (the dependency it imports; raises when absent)

        raise RuntimeError("nvidia_awq loads its tokenizer and calibration set (cnn_dailymail) from the Hugging Face "
                           "hub at run time (NVAWQWeightOnlyQuantConfig), which this machine cannot reach")
    else:
        raise ValueError(f"unknown MatMulNBitsQuantizer method {method!r}")
    quantizer = m.MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block, is_symmetric=symmetric,
                                       algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(out, use_external_data_format=False)


# ---------------------------------------------------------------------------- rows


def _base(tool: str, config: QuantConfig, algorithm: str) -> dict[str, Any]:
    return {"tool": tool, "label": f"{config_label(config)} {algorithm}", "bits": config.bits,
            "granularity": str(config.granularity), "symmetric": config.symmetric, "algorithm": algorithm}


def ours_row(config: QuantConfig, algorithm: str, src: Path, work: Path, options: StudyOptions, scorer: Scorer,
             fp32_value: float | None, feeds: Feeds | None, description: str) -> Row:
    """ox-quant's row for ``config`` under ``algorithm``."""
    from dataclasses import replace

    base = _base(OX_QUANT, config, algorithm)
    out = work / f"{src.stem}.{base['label'].replace(' ', '.').replace(':', '')}.onnx"
    calibrated = feeds if needs_calibration(algorithm) else None
    try:
        summary, seconds, peak = measured("ox_quant.study.algorithms:convert_in_child", str(src), str(out),
                                          replace(config, algorithm=algorithm), options.include_ops, calibrated,
                                          description)
    except ChildError as exc:
        remove_model(out)
        return Row(**base, status="refused", reason=f"{exc.type_name}: {exc}")
    try:
        if not summary["quantized"]:
            return Row(**base, status="not supported", convert_seconds=seconds, peak_rss_bytes=peak[0], start_rss_bytes=peak[1],
                       reason="no weight quantized: " + "; ".join(summary["skip_reasons"]))
        scales, _, _ = scale_bytes(out)
        row = measure_row(base, scorer, out, fp32_value)
        return Row(**{**row.as_dict(), "bits_per_weight": summary["bits_per_weight"], "scale_bytes": scales,
                      "weights_quantized": summary["quantized"], "params_quantized": summary["params"],
                      "layout": summary["layout"], "convert_seconds": seconds, "peak_rss_bytes": peak[0], "start_rss_bytes": peak[1],
                      "skipped": tuple(tuple(s) for s in summary["skipped"]),
                      "reason": f"calibration: {description}" if calibrated else ""})
    finally:
        if not options.keep_models:
            remove_model(out)


def peer_support(method: str, config: QuantConfig) -> str | None:
    """Why ``method`` cannot express ``config``, or None."""
    g = config.granularity
    if g.k_block is None:
        return f"not supported by MatMulNBitsQuantizer {method} (blocks along K only, not {g})"
    if config.bits not in PEER_BITS[method]:
        return (f"not supported by MatMulNBitsQuantizer {method} (it takes "
                f"{', '.join(map(str, PEER_BITS[method]))} bits, not {config.bits}; no {config.bits}-bit MatMulNBits kernel)")
    return None


def peer_method_row(config: QuantConfig, method: str, src: Path, work: Path, keep: bool, scorer: Scorer,
                    fp32_value: float | None, feeds: Feeds | None, description: str) -> Row:
    """ONNX Runtime's row for ``config`` under ``method``."""
    from ox_quant.errors import OxQuantError
    from ox_quant.pipeline.inspect import inspect_model

    base = _base(PEER, config, method)
    why = peer_support(method, config)
    if why is not None:
        return Row(**base, status="not supported", reason=why)
    assert config.granularity.k_block is not None
    out = work / f"{src.stem}.{base['label'].replace(' ', '.').replace(':', '')}.ort.onnx"
    try:
        _, seconds, peak = measured("ox_quant.study.algorithms:peer_in_child", str(src), str(out), method, config.bits,
                                    config.granularity.k_block, config.symmetric,
                                    feeds if method == "gptq" else None)
    except ChildError as exc:
        remove_model(out)
        return Row(**base, status="refused", reason=f"MatMulNBitsQuantizer {method} raised {exc.type_name}: {exc}")
    try:
        info = inspect_model(out)
        if not info.quantized:
            return Row(**base, status="not supported", convert_seconds=seconds, peak_rss_bytes=peak[0], start_rss_bytes=peak[1],
                       reason=f"MatMulNBitsQuantizer {method} quantized no weight")
        scales, count, numel = scale_bytes(out)
        layout = layout_of([("MatMul", q.format, f"{q.granularity}:{q.block_size}") for q in info.quantized])
        row = measure_row(base, scorer, out, fp32_value)
        return Row(**{**row.as_dict(), "bits_per_weight": info.bits_per_weight, "scale_bytes": scales,
                      "weights_quantized": count, "params_quantized": numel, "layout": layout,
                      "convert_seconds": seconds, "peak_rss_bytes": peak[0], "start_rss_bytes": peak[1],
                      "reason": f"calibration: {description}" if method == "gptq" else ""})
    except OxQuantError as exc:
        return Row(**base, status="failed", reason=str(exc), convert_seconds=seconds, peak_rss_bytes=peak[0], start_rss_bytes=peak[1])
    finally:
        if not keep:
            remove_model(out)
