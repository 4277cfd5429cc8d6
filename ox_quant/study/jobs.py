"""A study's rows as jobs: what one row measures, the context every row shares, and its key.

A ``RowJob`` is one configuration x one tool. A ``StudyContext`` is what any process needs to
measure it: the study options, the float ONNX (a path every worker sees: the study's ``--out``
directory), where converted models go, the task's options and the fp32 score. Both pickle, so
a scheduler can ship them to another process or host; the model files themselves never travel.

``row_key`` names a row's configuration: the row's own fields (tool, label, bits, granularity,
symmetric) and the study-wide settings that change what a row measures (format, symmetric
rule, quantized ops, task options, provider), plus the float model's hash and ox-quant's
version. ``--resume`` keeps a stored row only when its key is the key of a row asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ox_quant.core.config import QuantConfig
from ox_quant.study.rows import Row, StudyOptions, config_label


@dataclass(frozen=True)
class RowJob:
    """One row to measure: ``tool`` (``OX_QUANT`` or ``PEER``) on ``config``."""

    tool: str
    config: QuantConfig

    @property
    def label(self) -> str:
        return config_label(self.config)

    def describe(self) -> str:
        return f"{self.label}: {self.tool}"


@dataclass(frozen=True)
class StudyContext:
    """What every row of one study shares (picklable; paths, not file contents)."""

    options: StudyOptions
    src: Path
    """The float ONNX all rows convert, on a path every worker sees."""
    work: Path
    """Where converted models are written (and, unless ``keep_models``, removed)."""
    task_options: dict[str, Any]
    """Keyword options of the task's ``evaluate`` (the study's and the model's extras)."""
    fp32_value: float | None
    model_hash: str
    version: str


def model_files(path: Path) -> list[Path]:
    """The float ONNX file and every external-data file it names (name order)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: set[str] = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return [path, *(path.parent / n for n in sorted(names))]


def model_files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in model_files(path))


def model_hash(path: Path) -> str:
    """``sha256:...`` over the float ONNX file and its external-data files (``model_files``): names and bytes.

    The export is deterministic, so the same source weights and exporter give the same hash.
    """
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(os.fsencode(file.name) + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def row_key(tool: str, label: str, bits: int | None, granularity: str | None, symmetric: bool | None,
            options: StudyOptions, model_hash: str, version: str) -> str:
    """The identity of a row's measurement (see module doc), as a short hex digest."""
    fields = {
        "tool": tool, "label": label, "bits": bits, "granularity": granularity, "symmetric": symmetric,
        "format": options.format.value, "symmetric_rule": options.symmetric_rule.value,
        "include_ops": list(options.include_ops), "provider": options.provider,
        "task_options": {k: str(v) for k, v in options.task_options},
        "model_hash": model_hash, "ox_quant": version,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def job_key(job: RowJob, ctx: StudyContext) -> str:
    c = job.config
    return row_key(job.tool, job.label, c.bits, str(c.granularity), c.symmetric, ctx.options, ctx.model_hash,
                   ctx.version)


def stored_key(row: Row, options: StudyOptions, model_hash: str, version: str) -> str:
    """The key of a row read back from a ``study.json`` (with that study's options)."""
    return row_key(row.tool, row.label, row.bits, row.granularity, row.symmetric, options, model_hash, version)


def failed_row(job: RowJob, reason: str) -> Row:
    """The row of ``job`` when it could not be measured at all (a worker died, a timeout)."""
    c = job.config
    return Row(tool=job.tool, label=job.label, bits=c.bits, granularity=str(c.granularity), symmetric=c.symmetric,
               status="failed", reason=reason)
