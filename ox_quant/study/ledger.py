"""``study.json`` while a study runs: rows written as they finish, read back by ``--resume``.

Every write replaces the whole file atomically (a temp file in the same directory, flushed,
then renamed over ``study.json``), so an interrupted study (Ctrl-C, a killed process) leaves
the last complete file and no half-written one. A partial file has the shape of the final one
(``ox_quant.study.report.result_dict``, no claims yet) and ``details.rows_pending`` > 0.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ox_quant.errors import OxQuantError
from ox_quant.study.jobs import stored_key
from ox_quant.study.report import load_result, result_dict
from ox_quant.study.rows import Row, StudyResult

STUDY_JSON = "study.json"
_TEMP_SUFFIX = ".tmp"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename; the temp file never outlives a failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale_temps(out: Path) -> None:
    """Temp files a killed writer left (``.study.json.PID.tmp``)."""
    for p in out.glob(f".{STUDY_JSON}*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()


def write_partial(out: Path, result: StudyResult, pending: int) -> None:
    """``study.json`` with the rows measured so far (``pending`` still to come)."""
    data = result_dict(result)
    data["details"] = {**data["details"], "rows_pending": pending}
    atomic_write_text(out / STUDY_JSON, json.dumps(data, indent=1, default=str) + "\n")


def stored_rows(out: Path, model: str) -> tuple[dict[str, Row], StudyResult | None]:
    """Rows of ``out/study.json`` by key (``ox_quant.study.jobs.row_key``), and the stored study.

    Rows that failed are left out (measured again); ``partial`` rows are read back as ``ok``
    (``mark_partial`` judges them again with the final rows). Nothing when there is no file,
    it is another model's, or it has no model hash (written before ``--resume`` existed).
    """
    path = out / STUDY_JSON
    if not path.is_file():
        return {}, None
    try:
        stored = load_result(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise OxQuantError(f"--resume: {path} is not a study.json ox-quant can read ({type(exc).__name__}: {exc})") from None
    model_hash = stored.details.get("model_hash")
    version = stored.environment.get("ox_quant")
    if stored.model != model or not model_hash or not version:
        return {}, None
    rows: dict[str, Row] = {}
    for r in [stored.fp32, *stored.rows, *stored.peer_rows]:
        if r.status == "failed":
            continue
        if r.status == "partial":
            r = Row(**{**r.as_dict(), "status": "ok", "reason": ""})
        rows[stored_key(r, stored.options, model_hash, version)] = r
    return rows, stored
