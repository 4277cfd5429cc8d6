"""``ox-quant export SPEC -o OUT.onnx``: PyTorch model -> checked ONNX model."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from ox_quant.errors import OxQuantError


@click.command("export")
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option(
    "--dynamic-axis",
    "dynamic_axes",
    multiple=True,
    metavar="INPUT:AXIS=NAME",
    help="Make an input axis symbolic (repeatable). Default: axis 0 = batch, and axis 1 = sequence for token ids / [B,S,H] inputs.",
)
@click.option("--static", is_flag=True, help="No dynamic axes at all.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21).")
@click.option("--optimize/--no-optimize", default=True, show_default=True, help="onnxscript clean-up pass (weights stay initializers).")
@click.option("--external-data/--no-external-data", default=None, help="Weights in OUT.onnx.data (default: above 1 GiB).")
@click.option("--torchscript", is_flag=True, help="Use the TorchScript exporter instead of dynamo.")
@click.option("--check/--no-check", default=True, show_default=True, help="Run the export on ONNX Runtime and compare with PyTorch.")
@click.option("--check-min-sqnr", type=float, default=None, metavar="DB", help="SQNR the check requires (default 60 dB).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_cmd(
    spec: str,
    output: str,
    dynamic_axes: tuple[str, ...],
    static: bool,
    opset: int | None,
    optimize: bool,
    external_data: bool | None,
    torchscript: bool,
    check: bool,
    check_min_sqnr: float | None,
    as_json: bool,
) -> None:
    """Export the PyTorch model SPEC (FILE.py:FACTORY, module:FACTORY or a registered name) to ONNX."""
    from ox_quant.commands._display import console as make_console, db, metrics_table, quiet_torch
    from ox_quant.export.exporter import DEFAULT_CHECK_MIN_SQNR, DEFAULT_OPSET, export_spec, parse_dynamic_axis
    from ox_quant.core.jsonify import to_jsonable

    if static and dynamic_axes:
        raise OxQuantError("--static and --dynamic-axis exclude each other")
    axes = [] if static else ([parse_dynamic_axis(a) for a in dynamic_axes] or None)
    threshold = DEFAULT_CHECK_MIN_SQNR if check_min_sqnr is None else check_min_sqnr
    with quiet_torch(), contextlib.redirect_stdout(sys.stderr):
        report = export_spec(
            spec,
            output,
            dynamic_axes=axes,
            opset=DEFAULT_OPSET if opset is None else opset,
            optimize=optimize,
            external_data=external_data,
            check=check,
            check_min_sqnr_db=threshold,
            dynamo=not torchscript,
        )
    if as_json:
        payload = to_jsonable(report)
        payload["check_passed"] = report.check_passed
        payload["dynamic_axes"] = to_jsonable(report.dynamic_axes)
        click.echo(json.dumps(payload))
    else:
        console = make_console()
        console.print(f"wrote {report.output} ({report.exporter} exporter, opset {report.opset}, IR {report.ir_version}"
                      f"{', external data' if report.external_data else ''})", highlight=False)
        if report.fallback_reason:
            console.print(f"dynamo exporter failed, fell back to TorchScript: {report.fallback_reason}", highlight=False)
        axes_text = ", ".join(f"{a.input}[{a.axis}]={a.name}" for a in report.dynamic_axes) or "none"
        console.print(f"dynamic axes: {axes_text}", highlight=False)
        console.print(f"MatMul/Gemm weights stored as initializers: {report.matmul_weights} of {report.matmul_nodes} nodes", highlight=False)
        if report.check:
            console.print(metrics_table("ONNX Runtime (CPU) vs PyTorch on the example inputs", report.check))
    if not report.check_passed:
        worst = min(report.check, key=lambda m: m.sqnr_db)
        raise OxQuantError(
            f"the export does not match PyTorch: output {worst.name!r} SQNR {db(worst.sqnr_db)} dB "
            f"< {report.check_min_sqnr_db:g} dB (model kept at {report.output})"
        )
