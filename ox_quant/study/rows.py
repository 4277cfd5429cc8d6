"""The study's data: options, rows, claims, results, and the labels and lists they use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ox_quant.core.config import Format, Granularity, QuantConfig, SymmetricRule, parse_granularity
from ox_quant.errors import OxQuantError
from ox_quant.study.metrics import StudyMetric

DEFAULT_BITS = (8, 4, 3, 2)
DEFAULT_GRANULARITIES = "tensor,channel-group:128,channel,block:256,block:128,block:64,block:32"
#: Weights of these ops are quantized by default: every row then covers the same weights
#: (no format holds a 3-bit embedding table) and the peer, which handles MatMul only, too.
DEFAULT_OPS = ("MatMul", "Gemm", "Conv")
OX_QUANT = "ox-quant"
PEER = "onnxruntime"


def no_progress(stage: str, done: int, total: int) -> None:
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


def parse_only(text: str) -> tuple[tuple[int, str], ...]:
    """``"4:block:128,3:block:32"`` -> ``((4, "block:128"), (3, "block:32"))``."""
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        bits, _, gran = item.partition(":")
        if not bits.isdigit() or not gran:
            raise OxQuantError(f"--only {item!r}: expected BITS:GRANULARITY, e.g. 4:block:128")
        pairs.append((int(bits), str(parse_granularity(gran))))
    return tuple(pairs)


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
    algorithms: tuple[str, ...] = ()
    """ox-quant algorithms with a row each per configuration (``ox_quant.algorithms.registry``)."""
    peer_methods: tuple[str, ...] = ()
    """``MatMulNBitsQuantizer`` methods with a row each per configuration (``study.algorithms``)."""
    calibration_samples: int = 8
    calibration_seq_len: int = 256
    only: tuple[tuple[int, str], ...] = ()
    """``(bits, granularity)`` pairs: when given, the configurations are these of bits x granularities."""

    def configs(self) -> list[QuantConfig]:
        return [QuantConfig(bits=b, granularity=g, symmetric=self.symmetric, symmetric_rule=self.symmetric_rule,
                            format=self.format)
                for b in self.bits for g in self.granularities if not self.only or (b, str(g)) in self.only]


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
    algorithm: str = ""
    """Algorithm rows: the ox-quant algorithm or the ONNX Runtime method ("" on granularity rows)."""
    peak_rss_bytes: int | None = None
    """Algorithm rows: peak resident memory of the converting process (``study.child``)."""
    start_rss_bytes: int | None = None
    """Algorithm rows: that process's resident memory just before the conversion began."""

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
    algorithm_rows: tuple[Row, ...] = ()
    """ox-quant's algorithms and ONNX Runtime's methods per configuration (``study.algorithms``)."""
    calibration: str = ""
    """Where the algorithm rows' calibration feeds came from ("" without them)."""


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


def study_notes(options: StudyOptions, rows: list[Row], model_notes: tuple[str, ...] = ()) -> list[str]:
    """Caveats the rows need: Conv weights ignore block granularities; the model's own caveats
    (its study facts' ``notes``, e.g. SmolLM2's source format); float embedding tables."""
    notes = []
    if any("Conv: qdq channel" in r.layout and r.granularity not in ("channel", None) for r in rows):
        notes.append("Conv weights are written per output channel (QDQ) whatever block or channel-group "
                     "granularity a row asks for; those rows differ from per-channel only in their MatMul/Gemm "
                     "weights. Below 4 bits no format holds Conv weights, so those rows quantize MatMul/Gemm only "
                     "(status partial).")
    notes.extend(model_notes)
    if "Gather" not in options.include_ops:
        notes.append("Embedding tables (Gather) stay float in every row, so that every row quantizes the same "
                     "weights (no format holds a 3-bit table) and matches the peer, which quantizes MatMul only.")
    return notes
