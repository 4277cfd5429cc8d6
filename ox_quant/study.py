"""Granularity study: export a real model, convert it under every (bits, granularity), score each.

``run_study`` exports (or prepares) the fp32 ONNX of a registered real model into the output
directory, scores it (the baseline), then for each configuration runs ``convert`` and the
model's task, and, when asked, ONNX Runtime's own ``MatMulNBitsQuantizer`` on the same
configuration (``ox_quant.study_peer``). Every configuration yields a row: measured, or with
the reason it could not be (a format that cannot express it, a converter that refuses it).
Claims (``ox_quant.study_claims``) and the written report (``ox_quant.study_report``) are
built from the rows. The library never prints; progress goes through a callback.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ox_quant.config import Format, Granularity, QuantConfig, SymmetricRule, parse_granularity
from ox_quant.errors import OxQuantError
from ox_quant.study_metrics import StudyMetric, metric_for

#: ``progress(stage, done, total)``: ``stage`` says what runs now (e.g. "int4 block:128: convert").
StudyProgress = Callable[[str, int, int], None]

STUDY_MODELS = ("minilm", "smollm2", "crepe-tiny", "ppocr-rec")
DEFAULT_BITS = (8, 4, 3, 2)
DEFAULT_GRANULARITIES = "tensor,channel-group:128,channel,block:256,block:128,block:64,block:32"
#: Weights of these ops are quantized by default: every row then covers the same weights
#: (no format holds a 3-bit embedding table) and the peer, which handles MatMul only, too.
DEFAULT_OPS = ("MatMul", "Gemm", "Conv")
OX_QUANT = "ox-quant"
PEER = "onnxruntime"


def _no_progress(stage: str, done: int, total: int) -> None:
    """Default progress callback: does nothing."""


def parse_bits_list(text: str) -> tuple[int, ...]:
    """``"8,4,3,2"`` -> ``(8, 4, 3, 2)``."""
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise OxQuantError(f"--bits {text!r}: expected comma-separated integers, e.g. 8,4,3,2") from None
    if not bits:
        raise OxQuantError("--bits needs at least one bit width")
    for b in bits:
        QuantConfig(bits=b)  # validates the range
    return bits


def parse_granularity_list(text: str) -> tuple[Granularity, ...]:
    """``"tensor,channel,block:128"`` -> granularities, in order."""
    items = tuple(parse_granularity(g) for g in text.split(",") if g.strip())
    if not items:
        raise OxQuantError("--granularity needs at least one granularity")
    return items


@dataclass(frozen=True)
class StudyOptions:
    """What to study."""

    model: str
    bits: tuple[int, ...] = DEFAULT_BITS
    granularities: tuple[Granularity, ...] = field(default_factory=lambda: parse_granularity_list(DEFAULT_GRANULARITIES))
    symmetric: bool = True
    symmetric_rule: SymmetricRule = SymmetricRule.MIN_ERROR
    format: Format = Format.AUTO
    include_ops: tuple[str, ...] = DEFAULT_OPS
    peer: bool = True
    keep_models: bool = False
    task_options: tuple[tuple[str, Any], ...] = ()
    """Keyword options passed to the task's ``evaluate`` (smollm2: max_tokens, context, text)."""
    provider: str = "cpu"

    def configs(self) -> list[QuantConfig]:
        return [QuantConfig(bits=b, granularity=g, symmetric=self.symmetric, symmetric_rule=self.symmetric_rule,
                            format=self.format)
                for b in self.bits for g in self.granularities]


def config_label(config: QuantConfig) -> str:
    """``int4 block:128`` (``asym`` appended for asymmetric)."""
    return f"int{config.bits} {config.granularity}" + ("" if config.symmetric else " asym")


@dataclass(frozen=True)
class Row:
    """One configuration as one tool wrote it, and what it measured.

    ``status``: ``ok``; ``partial`` (measured, but fewer weights quantized than the study's
    fullest row: see ``reason``); ``not supported`` (the tool or format cannot express it);
    ``refused`` (the converter raised); ``failed`` (the result did not load or run).
    """

    tool: str
    label: str
    bits: int | None
    granularity: str | None
    symmetric: bool | None
    status: str
    reason: str = ""
    value: float | None = None
    change: float | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    bits_per_weight: float | None = None
    scale_bytes: int | None = None
    weights_quantized: int = 0
    params_quantized: int = 0
    layout: str = ""
    """How the weights were written, e.g. ``MatMul: matmulnbits block:128 x36``."""
    convert_seconds: float | None = None
    eval_seconds: float | None = None
    skipped: tuple[tuple[str, int], ...] = ()
    """Why weights were left in float: (reason, count)."""

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "partial")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Claim:
    """One textbook claim tested on the rows: verdict and the numbers behind it."""

    key: str
    statement: str
    verdict: str
    """``holds``, ``does not hold``, ``partly holds`` or ``not tested``."""
    evidence: str
    test: str
    """The rule applied, with its thresholds."""

    def as_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class StudyResult:
    model: str
    metric: StudyMetric
    options: StudyOptions
    fp32: Row
    rows: tuple[Row, ...]
    peer_rows: tuple[Row, ...]
    claims: tuple[Claim, ...]
    notes: tuple[str, ...]
    """The task's caveats (``TaskResult.notes``); the study's own come from :func:`study_notes`."""
    details: dict[str, Any]
    environment: dict[str, str]
    seconds: float


# ---------------------------------------------------------------------------- fp32 model


def export_fp32(model: str, out: Path) -> Path:
    """Write the fp32 ONNX of ``model`` to ``out``: TorchScript exporter for MiniLM and SmolLM2
    (dynamo takes minutes on them here), dynamo for CREPE, ``prepare()`` for PP-OCR."""
    from ox_quant.export import export_model

    if model == "ppocr-rec":
        from models import ppocr

        return ppocr.prepare(out)
    if model == "minilm":
        from models import minilm as module
    elif model == "smollm2":
        from models import smollm2 as module
    elif model == "crepe-tiny":
        from models import crepe as module
    else:
        raise OxQuantError(f"unknown model {model!r}: the study runs on {', '.join(STUDY_MODELS)}")
    net, inputs = module.factory()
    dynamo = model == "crepe-tiny"
    export_model(net, inputs, out, output_names=module.OUTPUT_NAMES, dynamo=dynamo, check=model != "smollm2")
    return out


def task_extras(model: str) -> dict[str, Any]:
    """Keyword options computed once per study (MiniLM: the fp32 torch reference embeddings)."""
    if model != "minilm":
        return {}
    from models import minilm
    from models.tasks.embedding import embed
    from models.tasks.sentences import sentences
    from ox_quant.tasks import TorchRunner

    return {"reference": embed(TorchRunner(minilm.load(), minilm.INPUT_NAMES), minilm.encode(sentences()))}


# ---------------------------------------------------------------------------- measuring


def scale_bytes(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(scale + zero-point bytes, quantized weights, their element count)`` of an ONNX file,
    any tool's (codes excluded), read from shapes and dtypes only."""
    import onnx_ir as ir

    from ox_quant.inspect import BITS_OF_DTYPE, describe_node
    from ox_quant.modelio import load_model

    model = load_model(path)
    total, count, numel = 0, 0, 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        info = describe_node(node)
        if info is None:
            continue
        codes = node.inputs[0] if node.op_type in ("DequantizeLinear", "GatherBlockQuantized") else node.inputs[1]
        tensor = codes.const_value if codes is not None else None
        code_bytes = 0
        if tensor is not None:
            bits = BITS_OF_DTYPE.get(tensor.dtype)
            code_bytes = -(-tensor.size * bits // 8) if bits is not None and bits < 8 else tensor.nbytes
        total += info.stored_bytes - code_bytes
        count += 1
        numel += info.numel
    return total, count, numel


def layout_of(entries: list[tuple[str, str, str]]) -> str:
    """``[(op, format, granularity)]`` -> ``"MatMul: matmulnbits block:128 x36; ..."``."""
    counts = Counter(entries)
    return "; ".join(f"{op}: {fmt} {gran} x{n}" for (op, fmt, gran), n in sorted(counts.items()))


class Scorer:
    """Scores ONNX files with the model's task, keeping per-study state (options, reference)."""

    def __init__(self, model: str, metric: StudyMetric, options: dict[str, Any], provider: str):
        from models.tasks import TASKS

        self.task = TASKS[model]
        self.evaluate = self.task.function()
        self.metric = metric
        self.options = options
        self.provider = provider

    def __call__(self, path: Path) -> tuple[dict[str, float], list[str], dict[str, Any], float]:
        start = time.perf_counter()
        result = self.evaluate(path, provider=self.provider, **self.options)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        if self.metric.name not in metrics:
            raise OxQuantError(f"task {self.task.name} did not report {self.metric.name}")
        return metrics, list(result.notes), dict(result.details), time.perf_counter() - start


def measure_row(base: dict[str, Any], scorer: Scorer, path: Path, fp32_value: float | None) -> Row:
    try:
        metrics, _, _, seconds = scorer(path)
    except OxQuantError as exc:
        return Row(**base, status="failed", reason=str(exc))
    value = metrics[scorer.metric.name]
    change = scorer.metric.change(value, fp32_value) if fp32_value is not None else None
    loss = scorer.metric.loss(value, fp32_value) if fp32_value is not None else None
    return Row(**base, status="ok", value=value, change=change, loss=loss, metrics=metrics, eval_seconds=seconds)


def run_ours(config: QuantConfig, src: Path, work: Path, options: StudyOptions, scorer: Scorer,
             fp32_value: float) -> Row:
    """Convert ``src`` with ox-quant under ``config`` and score the result."""
    from ox_quant.convert import ConvertOptions, convert
    from ox_quant.policy import UNIFORM
    from ox_quant.selection import Selection

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


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def mark_partial(rows: list[Row]) -> list[Row]:
    """Rows that quantized fewer weights than the fullest row become ``partial``, with the
    skip reasons the fullest row does not have."""
    measured = [r for r in rows if r.measured]
    if not measured:
        return rows
    fullest = max(measured, key=lambda r: r.weights_quantized)
    usual = dict(fullest.skipped)
    out = []
    for r in rows:
        if r.status == "ok" and r.weights_quantized < fullest.weights_quantized:
            extra = [f"{reason} (x{n - usual.get(reason, 0)})" for reason, n in r.skipped if n > usual.get(reason, 0)]
            why = f"{r.weights_quantized} of {fullest.weights_quantized} weights quantized; " + "; ".join(extra)
            out.append(Row(**{**r.as_dict(), "status": "partial", "reason": why}))
        else:
            out.append(r)
    return out


def study_notes(options: StudyOptions, rows: list[Row]) -> list[str]:
    """Caveats the rows need: Conv weights ignore block granularities; SmolLM2's source format."""
    notes = []
    if any("Conv: qdq channel" in r.layout and r.granularity not in ("channel", None) for r in rows):
        notes.append("Conv weights are written per output channel (QDQ) whatever block or channel-group "
                     "granularity a row asks for; those rows differ from per-channel only in their MatMul/Gemm "
                     "weights. Below 4 bits no format holds Conv weights, so those rows quantize MatMul/Gemm only "
                     "(status partial).")
    if options.model == "smollm2":
        notes.append("int4 block:32 asymmetric is near SmolLM2's source format (ONNX's integer zero points do not "
                     "land exactly on Q4_1's float-minimum grid, docs/real-models.md); no claim in this report rests "
                     "on that configuration (it is excluded from the claims when present).")
    if "Gather" not in options.include_ops:
        notes.append("Embedding tables (Gather) stay float in every row, so that every row quantizes the same "
                     "weights (no format holds a 3-bit table) and matches the peer, which quantizes MatMul only.")
    return notes


def environment() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

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


def run_study(options: StudyOptions, out_dir: str | os.PathLike, progress: StudyProgress = _no_progress) -> StudyResult:
    """Run the study (see module doc) and write its models under ``out_dir``; returns the rows and claims.

    Reports are written by ``ox_quant.study_report.write_report``.
    """
    from ox_quant.study_claims import evaluate_claims
    from ox_quant.study_peer import run_peer

    if options.model not in STUDY_MODELS:
        raise OxQuantError(f"unknown model {options.model!r}: the study runs on {', '.join(STUDY_MODELS)}")
    metric = metric_for(options.model)
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
    src = export_fp32(options.model, work / f"{options.model}.onnx")
    export_seconds = time.perf_counter() - t0
    step += 1
    progress("score fp32", step, total)
    scorer = Scorer(options.model, metric, {**dict(options.task_options), **task_extras(options.model)},
                    options.provider)
    metrics, notes, details, seconds = scorer(src)
    fp32 = Row(tool="fp32", label="fp32", bits=None, granularity=None, symmetric=None, status="ok",
               value=metrics[metric.name], change=0.0, loss=0.0, metrics=metrics, bits_per_weight=32.0,
               scale_bytes=0, eval_seconds=seconds)
    step += 1

    rows, peer_rows = [], []
    for config in configs:
        label = config_label(config)
        progress(f"{label}: ox-quant", step, total)
        rows.append(run_ours(config, src, work, options, scorer, fp32.value))
        step += 1
        if options.peer:
            progress(f"{label}: MatMulNBitsQuantizer", step, total)
            peer_rows.append(run_peer(config, src, work, options.keep_models, scorer, fp32.value))
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
    )
    return StudyResult(**{**result.__dict__, "claims": tuple(evaluate_claims(result))})
