"""Writing a study: ``study.md`` (tables and claims), ``study.json`` and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ox_quant.core.config import Format, SymmetricRule
from ox_quant.study.claims import excluded_from_claims
from ox_quant.study.metrics import StudyMetric
from ox_quant.study.rows import PEER, Row, StudyOptions, StudyResult, parse_granularity_list, study_notes
from ox_quant_models.tasks import TASKS

PLOT = "metric_vs_bpw.png"
PLOT_ZOOM = "metric_vs_bpw_4bit_and_up.png"
PLOT_ALGORITHMS = "algorithms_metric_vs_bpw.png"


def _num(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def result_dict(result: StudyResult, command: str | None = None) -> dict[str, Any]:
    """Everything of a study as plain JSON-able data."""
    m = result.metric
    opts = result.options
    return {
        "model": result.model,
        "command": command,
        "metric": {"task": m.task, "name": m.name, "direction": m.direction, "relative_change": m.relative,
                   "near_lossless_max_loss": m.lossless, "noticeable_min_loss": m.noticeable, "about": m.why},
        "options": {"bits": list(opts.bits), "granularities": [str(g) for g in opts.granularities],
                    "symmetric": opts.symmetric, "symmetric_rule": opts.symmetric_rule.value, "format": opts.format.value, "include_ops": list(opts.include_ops),
                    "peer": opts.peer, "task_options": {k: str(v) if isinstance(v, Path) else v for k, v in opts.task_options},
                    "provider": opts.provider, "algorithms": list(opts.algorithms),
                    "peer_methods": list(opts.peer_methods), "calibration_samples": opts.calibration_samples,
                    "calibration_seq_len": opts.calibration_seq_len,
                    "only": [list(p) for p in opts.only]},
        "fp32": result.fp32.as_dict(),
        "rows": [r.as_dict() for r in result.rows],
        "peer_rows": [r.as_dict() for r in result.peer_rows],
        "algorithm_rows": [r.as_dict() for r in result.algorithm_rows],
        "calibration": result.calibration,
        "claims": [c.as_dict() for c in result.claims],
        "notes": all_notes(result),
        "task_notes": list(result.notes),
        "details": result.details,
        "environment": result.environment,
        "seconds": round(result.seconds, 1),
    }


def all_notes(result: StudyResult) -> list[str]:
    """The task's caveats, then the study's (see ``study_notes``)."""
    task = TASKS.get(result.model)
    model_notes = task.study.notes if task is not None and task.study is not None else ()
    return list(dict.fromkeys([*result.notes, *study_notes(result.options, list(result.rows), model_notes)]))


_STUDY_NOTE_STARTS = ("Conv weights are written", "int4 block:32 asymmetric", "SmolLM2's fp32 weights are", "Embedding tables")


def load_result(path: str | os.PathLike) -> StudyResult:
    """A ``StudyResult`` from a ``study.json`` (claims evaluated again from its rows)."""
    from ox_quant.study.claims import evaluate_claims

    data = json.loads(Path(path).read_text(encoding="utf-8"))

    def row(d: dict[str, Any]) -> Row:
        return Row(**{**d, "skipped": tuple(tuple(x) for x in d.get("skipped", ()))})

    m, o = data["metric"], data["options"]
    metric = StudyMetric(m["task"], m["name"], m["direction"] == "higher is better", m["relative_change"],
                         m["near_lossless_max_loss"], m["noticeable_min_loss"], m["about"])
    options = StudyOptions(model=data["model"], bits=tuple(o["bits"]),
                           granularities=parse_granularity_list(",".join(o["granularities"])),
                           symmetric=o["symmetric"], format=Format(o["format"]),
                           symmetric_rule=SymmetricRule(o.get("symmetric_rule", "absmax")),  # absent: absmax, the rule then
                           include_ops=tuple(o["include_ops"]),
                           peer=o["peer"], task_options=tuple(o["task_options"].items()), provider=o["provider"],
                           algorithms=tuple(o.get("algorithms", ())), peer_methods=tuple(o.get("peer_methods", ())),
                           calibration_samples=o.get("calibration_samples", 8),
                           calibration_seq_len=o.get("calibration_seq_len", 256),
                           only=tuple((int(b), str(g)) for b, g in o.get("only", ())))
    task_notes = data.get("task_notes")
    if task_notes is None:  # written before task notes were kept apart
        task_notes = [n for n in data["notes"] if not n.startswith(_STUDY_NOTE_STARTS)]
    result = StudyResult(model=data["model"], metric=metric, options=options, fp32=row(data["fp32"]),
                         rows=tuple(row(r) for r in data["rows"]), peer_rows=tuple(row(r) for r in data["peer_rows"]),
                         claims=(), notes=tuple(task_notes), details=data["details"], environment=data["environment"],
                         seconds=data["seconds"],
                         algorithm_rows=tuple(row(r) for r in data.get("algorithm_rows", ())),
                         calibration=data.get("calibration", ""))
    return StudyResult(**{**result.__dict__, "claims": tuple(evaluate_claims(result))})


def _change_header(result: StudyResult) -> str:
    m = result.metric
    return f"change vs fp32 ({'relative, ' if m.relative else ''}{m.direction})"


def _row_cells(result: StudyResult, r: Row) -> list[str]:
    m = result.metric
    status = r.reason if r.reason.startswith(r.status) else f"{r.status}: {r.reason}" if r.reason else r.status
    excluded = excluded_from_claims(result.model, r)
    if excluded:
        status += f" (not used by any claim: {excluded})"
    return [
        r.label,
        r.layout or "-",
        _num(r.value) if r.measured else "-",
        m.format_change(r.change) if r.change is not None else "-",
        f"{r.bits_per_weight:.3f}" if r.bits_per_weight is not None else "-",
        str(r.scale_bytes) if r.scale_bytes is not None else "-",
        f"{r.weights_quantized} ({r.params_quantized / 1e6:.2f} M)" if r.measured and r.tool != "fp32" else "-",
        f"{r.convert_seconds:.1f}" if r.convert_seconds is not None else "-",
        f"{r.eval_seconds:.1f}" if r.eval_seconds is not None else "-",
        status.replace("|", "/"),
    ]


def _table(result: StudyResult, rows: list[Row]) -> list[str]:
    m = result.metric
    header = ["configuration", "written as", m.name, _change_header(result), "bits per weight",
              "scale + zero-point bytes", "weights (params)", "convert s", "eval s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_row_cells(result, r)) + " |")
    return lines


def markdown(result: StudyResult, command: str | None = None) -> str:
    """The study report as Markdown."""
    m = result.metric
    o = result.options
    fp32 = result.fp32
    lines = [f"# Granularity study: {result.model}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [
        f"Metric: **{m.name}** ({m.direction}): {m.why}.",
        f"fp32 ONNX baseline: {m.name} = {_num(fp32.value)} (eval {fp32.eval_seconds:.1f} s).",
        f"Quantized: weights of {', '.join(o.include_ops)} ops; "
        f"{f'symmetric (`{o.symmetric_rule}` rule)' if o.symmetric else 'asymmetric'}; "
        f"format `{o.format.value}`; round-to-nearest. Scored on ONNX Runtime {result.environment.get('onnxruntime')} "
        f"({o.provider.upper()} EP, DQ+MatMul fusion at float accuracy).",
        "Bits per weight: all stored bytes of the quantized weights (codes, scales, zero points) x 8 / their "
        "number of weights. Scale bytes: scales + zero points only, as stored in the file.",
        f"Study took {result.seconds:.0f} s on {result.environment.get('cpu_count')} CPU cores "
        f"(fp32 export {result.details.get('export_seconds', 0):.0f} s).",
        "",
    ]
    notes = all_notes(result)
    if notes:
        lines += ["## Caveats", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Claims", "",
              f"Thresholds for {m.name}: near lossless = loss <= {m.format_loss(m.lossless)}; "
              f"noticeable = loss >= {m.format_loss(m.noticeable)} (loss = change vs fp32 in the bad direction).",
              "", "| claim | verdict | evidence | rule |", "|---|---|---|---|"]
    for c in result.claims:
        lines.append(f"| {c.statement} | **{c.verdict}** | {c.evidence.replace('|', '/')} | {c.test} |")
    lines += ["", "## ox-quant", ""]
    lines += _table(result, [fp32, *result.rows])
    if result.peer_rows:
        lines += ["", "## ONNX Runtime MatMulNBitsQuantizer (peer, same configurations)", "",
                  "Default RTN, MatMul weights only, as it ships. Its symmetric mode uses a signed scale "
                  "(`w_ext / -2^(bits-1)`) that reaches all 2^bits levels (ox-quant's `--symmetric-rule signed`); "
                  "ox-quant's `min-error` rule keeps, per group, the lowest-error of a few scales including that one; "
                  "`absmax` keeps zero exact with `absmax / (2^(bits-1) - 1)` (one level unused; at 2 bits, ternary). "
                  "See docs/conventions.md.", ""]
        lines += _table(result, list(result.peer_rows))
    if result.algorithm_rows:
        lines += ["", "## Algorithms: ox-quant and ONNX Runtime's MatMulNBitsQuantizer methods", ""]
        lines += _algorithm_section(result)
    lines += ["", "## Plots", "", f"![{m.name} vs bits per weight]({PLOT})", "",
              f"![{m.name} vs bits per weight, 4 bits and up]({PLOT_ZOOM})", ""]
    env = ", ".join(f"{k} {v}" for k, v in result.environment.items())
    lines += ["## Environment", "", env, ""]
    return "\n".join(lines)


def _algorithm_section(result: StudyResult) -> list[str]:
    """The algorithm rows' table and a best-per-configuration summary."""
    m = result.metric
    lines = [f"Calibration (algorithms that read it, and ORT's gptq): {result.calibration or 'none'}; "
             "scored on a different source (see the metric). Each conversion ran in its own process: "
             "convert s = that process's wall time (interpreter start and imports included), peak RSS = its "
             "peak resident memory (in brackets: above its memory just before the conversion function was "
             "called; the libraries that function imports, ONNX Runtime and onnx among them, count in it). Layout, bits per weight and scale bytes as in the tables above.", ""]
    header = ["configuration", "tool", "algorithm", m.name, _change_header(result), "bits per weight",
              "convert s", "peak RSS MiB (over its start)", "eval s", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result.algorithm_rows:
        status = r.reason if r.reason.startswith(r.status) else f"{r.status}: {r.reason}" if r.reason else r.status
        lines.append("| " + " | ".join([
            f"int{r.bits} {r.granularity}" + ("" if r.symmetric else " asym"), r.tool, r.algorithm,
            _num(r.value) if r.measured else "-",
            m.format_change(r.change) if r.change is not None else "-",
            f"{r.bits_per_weight:.3f}" if r.bits_per_weight is not None else "-",
            f"{r.convert_seconds:.1f}" if r.convert_seconds is not None else "-",
            (f"{r.peak_rss_bytes / 2**20:.0f}" + (f" (+{(r.peak_rss_bytes - r.start_rss_bytes) / 2**20:.0f})"
                                                    if r.start_rss_bytes else "")) if r.peak_rss_bytes else "-",
            f"{r.eval_seconds:.1f}" if r.eval_seconds is not None else "-",
            status.replace("|", "/")]) + " |")
    lines += ["", "Best of each tool per configuration, at equal or fewer bits per weight (lowest loss vs fp32 "
              "among ONNX Runtime's rows whose measured bits per weight do not exceed the best ox-quant row's; "
              "a row whose measured bits per weight exceed the configuration's is not comparable: e.g. a method "
              "that wrote 4-bit codes when asked for 2):", "",
              "| configuration | best ox-quant | its " + _change_header(result) + " | best ONNX Runtime (<= bpw) | its "
              + _change_header(result) + " | closer to fp32 |", "|---|---|---|---|---|---|"]
    configs = list(dict.fromkeys((r.bits, r.granularity, r.symmetric) for r in result.algorithm_rows))

    def best_of(rows: list[Row]) -> Row | None:
        cands = [r for r in rows if r.measured and r.loss is not None and math.isfinite(r.loss)]
        return min(cands, key=lambda r: (r.loss or 0.0, r.bits_per_weight or 0.0)) if cands else None

    for bits, gran, sym in configs:
        here = [r for r in result.algorithm_rows if (r.bits, r.granularity, r.symmetric) == (bits, gran, sym)]
        ours = best_of([r for r in here if r.tool != PEER])
        limit = (ours.bits_per_weight or 0.0) + 1e-9 if ours else math.inf
        peer = best_of([r for r in here if r.tool == PEER and (r.bits_per_weight or 0.0) <= limit])
        if ours and peer and ours.loss is not None and peer.loss is not None:
            verdict = "ox-quant" if ours.loss < peer.loss else "ONNX Runtime" if peer.loss < ours.loss else "tie"
        else:
            verdict = "ox-quant only" if ours else "ONNX Runtime only" if peer else "-"
        cells = [f"int{bits} {gran}" + ("" if sym else " asym")]
        for b in (ours, peer):
            cells += [f"{b.algorithm} ({b.bits_per_weight or 0.0:.3f} bpw)" if b else "-",
                      m.format_change(b.change) if b and b.change is not None else "-"]
        lines.append("| " + " | ".join(cells + [verdict]) + " |")
    lines += ["", f"![algorithms: {m.name} vs bits per weight]({PLOT_ALGORITHMS})"]
    return lines


def plot_algorithms(result: StudyResult, path: Path) -> None:
    """Metric vs bits per weight of the algorithm rows, one marker per (tool, algorithm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.metric
    if result.fp32.value is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    groups: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for r in result.algorithm_rows:
        if r.measured and r.value is not None and math.isfinite(r.value):
            groups.setdefault((r.tool, r.algorithm), []).append(
                (r.bits_per_weight or 0.0, r.value, f"{r.bits}/{r.granularity}"))
    cmap = plt.get_cmap("tab10")
    for i, ((tool, algorithm), points) in enumerate(sorted(groups.items())):
        peer = tool == PEER
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker="s" if peer else "o",
                   color=cmap(i % 10), label=f"{'ORT ' if peer else 'ox-quant '}{algorithm}",
                   facecolors="none" if peer else None)
    ax.axhline(result.fp32.value, color="grey", linestyle=":", label="fp32")
    if not m.higher_is_better:
        values = [p[1] for pts in groups.values() for p in pts]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zero points)")
    ax.set_ylabel(f"{m.name} ({m.direction})")
    ax.set_title(f"{result.model}: algorithms, {m.name} vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot(result: StudyResult, path: Path, min_bits: int = 0) -> None:
    """Metric vs bits per weight, one line per granularity (ox-quant solid, peer dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.metric
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    fp32 = result.fp32.value
    if fp32 is None:
        return  # nothing to plot against
    # (bits per weight, metric value, bits) of every measured row, per (tool, granularity)
    groups: dict[tuple[str, str], list[tuple[float, float, int | None]]] = {}
    for r in [*result.rows, *result.peer_rows]:
        if r.status == "ok" and r.value is not None and (r.bits or 0) >= min_bits and math.isfinite(r.value):
            groups.setdefault((r.tool, r.granularity or ""), []).append((r.bits_per_weight or 0.0, r.value, r.bits))
    cmap = plt.get_cmap("tab10")
    colours = {g: cmap(i % 10) for i, g in enumerate(str(g) for g in result.options.granularities)}
    for (tool, gran), points in groups.items():
        points.sort(key=lambda p: p[0])
        peer = tool == PEER
        ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="--" if peer else "-",
                marker="s" if peer else "o", color=colours.get(gran, "black"), alpha=0.8 if peer else 1.0,
                label=f"{gran} (ORT quantizer)" if peer else gran)
        for bpw, value, bits in points:
            ax.annotate(f"{bits}", (bpw, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp32, color="grey", linestyle=":", label="fp32")
    values = sorted(p[1] for points in groups.values() for p in points)
    if min_bits and len(values) >= 4:  # zoom: the best three quarters of the points (others are in the table)
        import numpy as np

        if m.higher_is_better:
            lo, hi = float(np.quantile(values, 0.25)), max(values[-1], fp32)
        else:
            lo, hi = min(values[0], fp32), float(np.quantile(values, 0.75))
        pad = (hi - lo) * 0.08 or abs(hi) * 0.01 or 1e-6
        ax.set_ylim(lo - pad, hi + pad)
        ax.text(0.01, 0.01, "y range: best 75% of points; the rest are off the chart (see the tables)",
                transform=ax.transAxes, fontsize=7, color="grey")
    elif not m.higher_is_better and values and values[0] > 0 and values[-1] / max(values[0], 1e-12) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zero points)")
    ax.set_ylabel(f"{m.name} ({m.direction})")
    title = f"{result.model}: {m.name} vs bits per weight"
    ax.set_title(title + (f" ({min_bits} bits and up)" if min_bits else "") + "; point labels = bits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(result: StudyResult, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """Write ``study.md``, ``study.json`` and the PNG plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "study.md", out / "study.json"
    _atomic_write(js, json.dumps(result_dict(result, command), indent=1, default=str) + "\n")
    _atomic_write(md, markdown(result, command))
    plot(result, out / PLOT)
    plot(result, out / PLOT_ZOOM, min_bits=4)
    paths = [md, js, out / PLOT, out / PLOT_ZOOM]
    if result.algorithm_rows:
        plot_algorithms(result, out / PLOT_ALGORITHMS)
        paths.append(out / PLOT_ALGORITHMS)
    return paths
