"""Granularity study: export a real model, convert it under every (bits, granularity), score each.

``run_study`` exports (or prepares) the fp32 ONNX of a registered real model into the output
directory, scores it (the baseline), then for each configuration runs ``convert`` and the
model's task, and, when asked, ONNX Runtime's own ``MatMulNBitsQuantizer`` on the same
configuration (``ox_quant.study.peer``). Every configuration yields a row: measured, or with
the reason it could not be (a format that cannot express it, a converter that refuses it).
Claims (``ox_quant.study.claims``) and the written report (``ox_quant.study.report``) are
built from the rows. The library never prints; progress goes through a callback.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ox_quant.core.config import QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.runtime.ort import load as load_onnxruntime
from ox_quant.study.measure import Scorer, layout_of, measure_row, remove_model, scale_bytes
from ox_quant.study.rows import OX_QUANT, Row, StudyOptions, StudyResult, config_label, mark_partial, no_progress

#: ``progress(stage, done, total)``: ``stage`` says what runs now (e.g. "int4 block:128: convert").
StudyProgress = Callable[[str, int, int], None]

# ---------------------------------------------------------------------------- fp32 model


def run_ours(config: QuantConfig, src: Path, work: Path, options: StudyOptions, scorer: Scorer,
             fp32_value: float | None) -> Row:
    """Convert ``src`` with ox-quant under ``config`` and score the result."""
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.pipeline.policy import UNIFORM
    from ox_quant.pipeline.selection import Selection

    label = config_label(config)
    base: dict[str, Any] = {"tool": OX_QUANT, "label": label, "bits": config.bits,
                            "granularity": str(config.granularity), "symmetric": config.symmetric}
    out = work / f"{src.stem}.{label.replace(' ', '.').replace(':', '')}.onnx"
    start = time.perf_counter()
    try:
        report = convert(src, out, ConvertOptions(config=config, selection=Selection(include_ops=options.include_ops),
                                                      policy=UNIFORM))
    except OxQuantError as exc:
        return Row(**base, status="refused", reason=str(exc), convert_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    try:
        if not report.quantized:
            reasons = sorted({s.reason for s in report.skipped})
            return Row(**base, status="not supported", reason="no weight quantized: " + "; ".join(reasons),
                       convert_seconds=seconds)
        scales, _, _ = scale_bytes(out)
        layout = layout_of([(q.op, q.format, q.granularity + (f":{q.block_size}" if q.granularity in ("block", "channel-group") else ""))
                            for q in report.quantized])
        row = measure_row(base, scorer, out, fp32_value)
        skipped = tuple(sorted(Counter(s.reason for s in report.skipped).items()))
        return Row(**{**row.as_dict(), "bits_per_weight": report.bits_per_weight, "scale_bytes": scales,
                      "weights_quantized": len(report.quantized),
                      "params_quantized": sum(q.shape[0] * q.shape[1] for q in report.quantized),
                      "layout": layout, "convert_seconds": seconds, "skipped": skipped})
    finally:
        if not options.keep_models:
            remove_model(out)


def environment() -> dict[str, str]:
    import numpy
    import onnx
    onnxruntime = load_onnxruntime()

    from ox_quant import __version__

    env = {"ox_quant": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
           "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": str(os.cpu_count())}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def run_study(options: StudyOptions, out_dir: str | os.PathLike, progress: StudyProgress = no_progress) -> StudyResult:
    """Run the study (see module doc) and write its models under ``out_dir``; returns the rows and claims.

    Reports are written by ``ox_quant.study.report.write_report``.
    """
    from ox_quant.study.algorithms import ours_row, peer_method_row
    from ox_quant.study.claims import evaluate_claims
    from ox_quant.study.peer import run_peer
    from ox_quant_models.tasks import study_facts

    facts = study_facts(options.model)
    metric = facts.metric
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "models"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    configs = options.configs()
    total = 2 + len(configs) * (2 if options.peer else 1)
    step = 0

    progress("export fp32", step, total)
    t0 = time.perf_counter()
    src = facts.export(work / f"{options.model}.onnx")
    export_seconds = time.perf_counter() - t0
    step += 1
    progress("score fp32", step, total)
    scorer = Scorer(options.model, metric, {**dict(options.task_options), **facts.task_extras()},
                    options.provider)
    metrics, notes, details, seconds = scorer(src)
    fp32 = Row(tool="fp32", label="fp32", bits=None, granularity=None, symmetric=None, status="ok",
               value=metrics[metric.name], change=0.0, loss=0.0, metrics=metrics, bits_per_weight=32.0,
               scale_bytes=0, eval_seconds=seconds)
    step += 1

    feeds, description = None, ""
    if options.algorithms or options.peer_methods:
        calib = facts.calibration_feeds(options.calibration_samples, options.calibration_seq_len)
        if calib is not None:
            source, description, feeds = calib
            if source in details.get("texts", ()):
                raise OxQuantError(f"the calibration text {source} is also scored: score another text "
                                   f"(e.g. --text with a different file)")
    algo_total = len(configs) * (len(options.algorithms) + len(options.peer_methods))
    total += algo_total
    rows, peer_rows, algorithm_rows = [], [], []
    for config in configs:
        label = config_label(config)
        progress(f"{label}: ox-quant", step, total)
        rows.append(run_ours(config, src, work, options, scorer, fp32.value))
        step += 1
        if options.peer:
            progress(f"{label}: MatMulNBitsQuantizer", step, total)
            peer_rows.append(run_peer(config, src, work, options.keep_models, scorer, fp32.value))
            step += 1
        for algorithm in options.algorithms:
            progress(f"{label}: ox-quant {algorithm}", step, total)
            algorithm_rows.append(ours_row(config, algorithm, src, work, options, scorer, fp32.value, feeds,
                                           description))
            step += 1
        for method in options.peer_methods:
            progress(f"{label}: MatMulNBitsQuantizer {method}", step, total)
            algorithm_rows.append(peer_method_row(config, method, src, work, options.keep_models, scorer, fp32.value,
                                                  feeds, description))
            step += 1
    progress("done", total, total)
    rows = mark_partial(rows)
    if not options.keep_models:
        remove_model(src)
        if not any(work.iterdir()):
            work.rmdir()
    result = StudyResult(
        model=options.model, metric=metric, options=options, fp32=fp32, rows=tuple(rows), peer_rows=tuple(peer_rows),
        claims=(), notes=tuple(dict.fromkeys(notes)), details={**details, "export_seconds": round(export_seconds, 2)},
        environment=environment(), seconds=time.perf_counter() - started,
        algorithm_rows=tuple(algorithm_rows), calibration=description,
    )
    return StudyResult(**{**result.__dict__, "claims": tuple(evaluate_claims(result))})
