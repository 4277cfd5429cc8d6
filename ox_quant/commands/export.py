"""``ox-quant export SPEC -o OUT.onnx``: PyTorch model -> checked ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ox_quant.errors import OxQuantError

ATTENTION_WORDS = {"group-query": "one com.microsoft.GroupQueryAttention node per layer (the cache is decoded in "
                                  "shared past/present buffers)",
                   "plain": "plain ONNX operators (past and present are separate tensors)"}


@click.command("export")
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx path (a folder with --kv-cache).")
@click.option("--kv-cache", is_flag=True,
              help="Causal LMs: export with past/present key-value inputs/outputs into the folder OUTPUT "
              "(model.onnx, genai_config.json, tokenizer files), ready for `ox-quant generate` and ONNX Runtime GenAI.")
@click.option("--plain-attention", is_flag=True,
              help="--kv-cache: write attention as plain ONNX operators, not one com.microsoft.GroupQueryAttention "
              "node per layer (ONNX Runtime's CUDA GroupQueryAttention takes float16 only; other runtimes lack it).")
@click.option(
    "--dynamic-axis",
    "dynamic_axes",
    multiple=True,
    metavar="INPUT:AXIS=NAME",
    help="Make an input axis symbolic (repeatable); then no other axis is. Default: inferred from the example "
    "inputs' names and shapes (batch; sequence for ids, masks and [B,S,H]; frames for [B,features,T] audio; "
    "past_sequence for past keys/values; decoder_sequence for decoder inputs), then checked.",
)
@click.option(
    "--static-axis",
    "static_axes",
    multiple=True,
    metavar="INPUT:AXIS|NAME",
    help="Keep an input axis (or every axis of that name, e.g. batch) at its example size (repeatable).",
)
@click.option("--static", is_flag=True, help="No dynamic axes at all.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21).")
@click.option("--optimize/--no-optimize", default=True, show_default=True, help="onnxscript clean-up pass (weights stay initializers).")
@click.option("--external-data/--no-external-data", default=None, help="Weights in OUT.onnx.data (default: above 1 GiB).")
@click.option("--torchscript", is_flag=True, help="Use the TorchScript exporter instead of dynamo.")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run the export on ONNX Runtime and compare with PyTorch, at the example shapes and with every "
    "dynamic axis at a second size (batch 1 -> 3, sequence 16 -> 12, ...).",
)
@click.option("--check-min-sqnr", type=float, default=None, metavar="DB", help="SQNR the check requires (default 60 dB).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None, help="Write what the exporters print here (kept off the terminal; --debug shows it on failure).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def export_cmd(
    ctx: click.Context,
    spec: str,
    output: str,
    kv_cache: bool,
    plain_attention: bool,
    dynamic_axes: tuple[str, ...],
    static_axes: tuple[str, ...],
    static: bool,
    opset: int | None,
    optimize: bool,
    external_data: bool | None,
    torchscript: bool,
    check: bool,
    check_min_sqnr: float | None,
    log_file: str | None,
    as_json: bool,
) -> None:
    """Export the PyTorch model SPEC (FILE.py:FACTORY, module:FACTORY or a registered name) to ONNX."""
    from ox_quant.commands._display import console as make_console
    from ox_quant.commands._display import db, metrics_table
    from ox_quant.core.jsonify import to_jsonable
    from ox_quant.export.exporter import (
        DEFAULT_CHECK_MIN_SQNR,
        DEFAULT_OPSET,
        export_spec,
        parse_dynamic_axis,
    )
    from ox_quant.export.log import ExportError

    if static and (dynamic_axes or static_axes):
        raise OxQuantError("--static and --dynamic-axis / --static-axis exclude each other")
    axes = [] if static else ([parse_dynamic_axis(a) for a in dynamic_axes] or None)
    threshold = DEFAULT_CHECK_MIN_SQNR if check_min_sqnr is None else check_min_sqnr
    if kv_cache:
        if static or dynamic_axes or static_axes:
            raise OxQuantError("--kv-cache sets the axes itself (batch, sequence, past_sequence, total_sequence)")
        _export_kv(ctx, spec, output, opset, optimize, external_data, torchscript, check, threshold, log_file, as_json,
                   plain_attention)
        return
    if plain_attention:
        raise OxQuantError("--plain-attention applies to --kv-cache exports")
    try:
        report = export_spec(
            spec,
            output,
            dynamic_axes=axes,
            static_axes=static_axes,
            opset=DEFAULT_OPSET if opset is None else opset,
            optimize=optimize,
            external_data=external_data,
            check=check,
            check_min_sqnr_db=threshold,
            dynamo=not torchscript,
        )
    except ExportError as exc:
        debug = bool((ctx.obj or {}).get("debug"))
        if log_file:
            _write_log(log_file, exc.log)
        elif debug:
            click.echo(exc.log, err=True, nl=False)
        where = f"exporter output in {log_file}" if log_file else "rerun with --debug or --log FILE for the exporter output"
        raise OxQuantError(f"{exc} ({where})" if exc.log and not debug else str(exc)) from exc
    if log_file:
        _write_log(log_file, report.log)
    if as_json:
        payload = to_jsonable(report)
        payload.pop("log", None)
        payload["check_passed"] = report.check_passed
        payload["dynamic_axes"] = to_jsonable(report.dynamic_axes)
        click.echo(json.dumps(payload))
    else:
        console = make_console()
        console.print(f"wrote {report.output} ({report.exporter} exporter, opset {report.opset}, IR {report.ir_version}"
                      f"{', external data' if report.external_data else ''})", highlight=False, markup=False)
        if report.fallback_reason:
            console.print(f"dynamo exporter failed, fell back to TorchScript: {report.fallback_reason}", highlight=False, markup=False)
        _print_axes(console, report)
        console.print(f"MatMul/Gemm weights stored as initializers: {report.matmul_weights} of {report.matmul_nodes} nodes", highlight=False)
        if report.check:
            console.print(metrics_table("ONNX Runtime (CPU) vs PyTorch on the example inputs", report.check))
        if report.shape_check:
            sizes = ", ".join(f"{k}={v}" for k, v in report.shape_check.sizes.items())
            console.print(metrics_table(f"ONNX Runtime (CPU) vs PyTorch at {sizes}", report.shape_check.metrics))
    if not report.check_passed:
        worst = min(report.check, key=lambda m: m.sqnr_db)
        raise OxQuantError(
            f"the export does not match PyTorch: output {worst.name!r} SQNR {db(worst.sqnr_db)} dB "
            f"< {report.check_min_sqnr_db:g} dB (model kept at {report.output})"
        )


def _write_log(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise OxQuantError(f"cannot write the log {path}: {exc.strerror or exc}") from exc


def _print_axes(console, report) -> None:
    """Dynamic axes with why, how they were checked, and the static axes that were in question."""
    dynamic = [c for c in report.axes if c.name]
    if report.shape_check:
        checked = ", ".join(f"{k} {report.shape_check.example[k]} -> {v}" for k, v in report.shape_check.sizes.items())
        head = f"dynamic axes (checked on ONNX Runtime against PyTorch at {checked}):"
    elif dynamic and report.check_min_sqnr_db is None:
        head = "dynamic axes (not checked at other sizes: --no-check):"
    else:
        head = "dynamic axes:"
    console.print(head if dynamic else "dynamic axes: none", highlight=False)
    for c in dynamic:
        console.print(f"  {c.input}[{c.axis}]={c.name}: {c.reason}", highlight=False, markup=False)
    for c in report.axes:
        if c.name is None and any(word in c.reason for word in ("PyTorch", "feature", "static-axis", "checked")):
            console.print(f"  {c.input}[{c.axis}] static: {c.reason}", highlight=False, markup=False)


def _export_kv(ctx: click.Context, spec: str, output: str, opset: int | None, optimize: bool,
               external_data: bool | None, torchscript: bool, check: bool, threshold: float,
               log_file: str | None, as_json: bool, plain_attention: bool = False) -> None:
    """``--kv-cache``: the folder export (``ox_quant.export.kvcache``). TorchScript unless the
    dynamo exporter is asked for (it is the slower one on LLMs): ``--torchscript`` is the default here."""
    from ox_quant.core.jsonify import to_jsonable
    from ox_quant.export.exporter import DEFAULT_OPSET
    from ox_quant.export.kvcache import export_kv_spec
    from ox_quant.export.log import ExportError

    if output.lower().endswith(".onnx"):
        raise OxQuantError(f"--kv-cache writes a folder: give -o DIR, not {output}")
    try:
        report = export_kv_spec(spec, output, opset=DEFAULT_OPSET if opset is None else opset, optimize=optimize,
                                external_data=external_data, check=check, check_min_sqnr_db=threshold,
                                fused_attention=False if plain_attention else None)
    except ExportError as exc:
        if log_file:
            _write_log(log_file, exc.log)
        elif (ctx.obj or {}).get("debug"):
            click.echo(exc.log, err=True, nl=False)
        raise OxQuantError(str(exc)) from exc
    if log_file:
        _write_log(log_file, report.export.log)
    if as_json:
        payload = {"folder": report.folder, "files": list(report.files), "layout": report.layout,
                   "tokenizer": report.tokenizer, "exporter": report.export.exporter, "attention": report.attention,
                   "check": to_jsonable(report.export.check),
                   "shape_check": to_jsonable(report.export.shape_check),
                   "dynamic_axes": to_jsonable(report.export.dynamic_axes)}
        click.echo(json.dumps(payload))
        return
    layout = report.layout
    click.echo(f"wrote {report.folder}: {', '.join(report.files)}")
    click.echo(f"  {layout['layers']} layers, {layout['heads']} heads / {layout['kv_heads']} key-value heads of "
               f"{layout['head_dim']}, context {layout['context_length']}")
    click.echo(f"  attention: {ATTENTION_WORDS[report.attention]}")
    if not report.tokenizer:
        click.echo("  no tokenizer: the model's factory has no tokenizer() beside it; generate needs tokenizer.json")
    worst = min(report.export.check, key=lambda m: m.sqnr_db) if report.export.check else None
    if worst is not None:
        click.echo(f"  ONNX Runtime vs PyTorch (batch 2, 3 cached + 5 new tokens): worst SQNR {worst.sqnr_db:.1f} dB ({worst.name})")
    if report.export.shape_check:
        sizes = ", ".join(f"{k}={v}" for k, v in report.export.shape_check.sizes.items())
        low = min(m.sqnr_db for m in report.export.shape_check.metrics)
        click.echo(f"  and at {sizes}: worst SQNR {low:.1f} dB")
