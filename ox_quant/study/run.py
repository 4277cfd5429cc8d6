"""Granularity study: export a real model, convert it under every (bits, granularity), score each.

``run_study`` exports (or prepares) the fp32 ONNX of a registered real model into the output
directory, scores it (the baseline), then for each configuration runs ``convert`` and the
model's task, and, when asked, ONNX Runtime's own ``MatMulNBitsQuantizer`` on the same
configuration (``ox_quant.study.peer``). Every configuration yields a row: measured, or with
the reason it could not be (a format that cannot express it, a converter that refuses it).
Claims (``ox_quant.study.claims``) and the written report (``ox_quant.study.report``) are
built from the rows. The library never prints; progress goes through a callback.

Each row (configuration x tool) is a ``RowJob`` measured by ``measure``; a scheduler decides
where: ``sequential`` (default, this process) or ``ox_quant.study.ray_scheduler`` (Ray tasks).
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ox_quant.core.config import QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.runtime.ort import load as load_onnxruntime
from ox_quant.study.jobs import RowJob, StudyContext, job_key, model_hash, row_key
from ox_quant.study.measure import Scorer, layout_of, measure_row, remove_model, scale_bytes
from ox_quant.study.rows import OX_QUANT, PEER, Row, StudyOptions, StudyResult, config_label, mark_partial, no_progress

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


def measure(job: RowJob, ctx: StudyContext) -> Row:
    """Measure one row (the one function both schedulers call): convert ``ctx.src`` with the
    job's tool under its configuration, score the result with the model's task."""
    from ox_quant.study.peer import run_peer
    from ox_quant_models.tasks import study_facts

    scorer = Scorer(ctx.options.model, study_facts(ctx.options.model).metric, ctx.task_options, ctx.options.provider)
    if job.tool == OX_QUANT:
        return run_ours(job.config, ctx.src, ctx.work, ctx.options, scorer, ctx.fp32_value)
    return run_peer(job.config, ctx.src, ctx.work, ctx.options.keep_models, scorer, ctx.fp32_value)


#: ``on_row(job, row)``: called in the study's process as each row finishes, in any order.
RowDone = Callable[[RowJob, Row], None]


class Scheduler(Protocol):
    """Runs ``measure`` on every job and hands each row to ``on_row`` as it finishes;
    ``on_stage(text)`` says what runs now."""

    def __call__(self, jobs: list[RowJob], ctx: StudyContext, on_row: RowDone,
                 on_stage: Callable[[str], None]) -> None: ...


def sequential(jobs: list[RowJob], ctx: StudyContext, on_row: RowDone, on_stage: Callable[[str], None]) -> None:
    """The default scheduler: every row in this process, in order."""
    for job in jobs:
        on_stage(_stage(job))
        on_row(job, measure(job, ctx))


def _stage(job: RowJob) -> str:
    from ox_quant.study.peer import PEER_NAME

    return f"{job.label}: {PEER_NAME if job.tool == PEER else OX_QUANT}"


def run_study(options: StudyOptions, out_dir: str | os.PathLike, progress: StudyProgress = no_progress,
              scheduler: Scheduler = sequential, resume: bool = False) -> StudyResult:
    """Run the study (see module doc) and write its models under ``out_dir``; returns the rows and claims.

    The fp32 export and its score run here, once; ``scheduler`` measures the rows. Each finished
    row is written into ``out_dir/study.json`` at once (``ox_quant.study.ledger``). ``resume``:
    rows already there with the same key (configuration, model hash, ox-quant version;
    ``ox_quant.study.jobs.row_key``) are kept, not measured again. Reports are written by
    ``ox_quant.study.report.write_report``.
    """
    from ox_quant import __version__
    from ox_quant.study.algorithms import ours_row, peer_method_row
    from ox_quant.study.claims import evaluate_claims
    from ox_quant.study.ledger import remove_stale_temps, stored_rows, write_partial
    from ox_quant_models.tasks import study_facts

    facts = study_facts(options.model)
    metric = facts.metric
    out = Path(out_dir).resolve()  # absolute: workers on other hosts open the same path
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    work = out / "models"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    jobs = [RowJob(tool, config) for config in options.configs()
            for tool in ((OX_QUANT, PEER) if options.peer else (OX_QUANT,))]
    total = 2 + len(jobs)
    stored, previous = stored_rows(out, options.model) if resume else ({}, None)

    progress("export fp32", 0, total)
    t0 = time.perf_counter()
    src = facts.export(work / f"{options.model}.onnx")
    export_seconds = time.perf_counter() - t0
    digest = model_hash(src)
    progress("score fp32", 1, total)
    task_options = {**dict(options.task_options), **facts.task_extras()}
    fp32 = stored.get(row_key("fp32", "fp32", None, None, None, options, digest, __version__))
    fp32_kept = fp32 is not None and previous is not None
    if fp32 is not None and previous is not None:
        notes, details = list(previous.notes), {k: v for k, v in previous.details.items()
                                                 if k not in ("export_seconds", "model_hash", "rows_pending", "rows_reused")}
    else:
        metrics, notes, details, seconds = Scorer(options.model, metric, task_options, options.provider)(src)
        fp32 = Row(tool="fp32", label="fp32", bits=None, granularity=None, symmetric=None, status="ok",
                   value=metrics[metric.name], change=0.0, loss=0.0, metrics=metrics, bits_per_weight=32.0,
                   scale_bytes=0, eval_seconds=seconds)
    ctx = StudyContext(options=options, src=src, work=work, task_options=task_options, fp32_value=fp32.value,
                       model_hash=digest, version=__version__)
    keys = {job: job_key(job, ctx) for job in jobs}
    done: dict[RowJob, Row] = {job: stored[k] for job, k in keys.items() if k in stored}
    details = {**details, "export_seconds": round(export_seconds, 2), "model_hash": digest}
    if done or fp32_kept:
        details["rows_reused"] = len(done) + fp32_kept  # the fp32 row counts

    def result(rows: list[Row], peer_rows: list[Row]) -> StudyResult:
        return StudyResult(
            model=options.model, metric=metric, options=options, fp32=fp32, rows=tuple(rows),
            peer_rows=tuple(peer_rows), claims=(), notes=tuple(dict.fromkeys(notes)), details=details,
            environment=environment(), seconds=time.perf_counter() - started)

    def in_order() -> tuple[list[Row], list[Row]]:
        ours = [done[j] for j in jobs if j in done and j.tool == OX_QUANT]
        return ours, [done[j] for j in jobs if j in done and j.tool == PEER]

    def on_row(job: RowJob, row: Row) -> None:
        done[job] = row
        write_partial(out, result(*in_order()), len(jobs) - len(done))
        progress(f"{row.label}: {row.tool} {row.status}", 2 + len(done), total)

    write_partial(out, result(*in_order()), len(jobs) - len(done))
    progress("rows", 2 + len(done), total)
    scheduler([j for j in jobs if j not in done], ctx, on_row, lambda stage: progress(stage, 2 + len(done), total))
    rows, peer_rows = in_order()
    algorithm_rows = []
    feeds, description = None, ""
    if options.algorithms or options.peer_methods:
        calib = facts.calibration_feeds(options.calibration_samples, options.calibration_seq_len)
        if calib is not None:
            source, description, feeds = calib
            if source in details.get("texts", ()):
                raise OxQuantError(f"the calibration text {source} is also scored: score another text "
                                   f"(e.g. --text with a different file)")
        scorer = Scorer(options.model, metric, task_options, options.provider)
        pending = len(options.configs()) * (len(options.algorithms) + len(options.peer_methods))

        def measured(row: Row) -> None:  # written at once: a stopped study keeps the rows it measured
            algorithm_rows.append(row)
            partial = result(*in_order())
            write_partial(out, StudyResult(**{**partial.__dict__, "algorithm_rows": tuple(algorithm_rows),
                                              "calibration": description}), pending - len(algorithm_rows))

        for config in options.configs():
            label = config_label(config)
            for algorithm in options.algorithms:
                progress(f"{label}: ox-quant {algorithm}", total, total)
                measured(ours_row(config, algorithm, src, work, options, scorer, fp32.value, feeds, description))
            for method in options.peer_methods:
                progress(f"{label}: MatMulNBitsQuantizer {method}", total, total)
                measured(peer_method_row(config, method, src, work, options.keep_models, scorer, fp32.value, feeds,
                                         description))
    progress("done", total, total)
    if not options.keep_models:
        remove_model(src)
        if not any(work.iterdir()):
            work.rmdir()
    final = result(mark_partial(rows), peer_rows)
    final = StudyResult(**{**final.__dict__, "algorithm_rows": tuple(algorithm_rows), "calibration": description})
    return StudyResult(**{**final.__dict__, "claims": tuple(evaluate_claims(final))})
