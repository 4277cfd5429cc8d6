"""``ox-quant verify REF CAND``: how close CAND stays to REF, per output and per layer."""

from __future__ import annotations

import contextlib
import json
import sys

import click
from rich.table import Table

from ox_quant.errors import OxQuantError


@click.command("verify")
@click.argument("reference")
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help=".npz with one array per model input.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--exact/--fast", default=True, show_default=True,
              help="--fast lets ORT run fused DQ+MatMul with int8 activations (accuracy_level 4).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE", help="Size of a symbolic dimension (repeatable).")
@click.option("--int-range", metavar="LO:HI", help="Range [LO, HI) of generated integer inputs.")
@click.option("--min-sqnr", type=float, metavar="DB", help="Fail (exit 1) when an output's SQNR is lower.")
@click.option("--min-cosine", type=float, help="Fail (exit 1) when an output's cosine similarity is lower.")
@click.option("--per-layer", is_flag=True, help="Error caused by each quantized weight, and each quantized activation, alone (ONNX REF).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Layers shown with --per-layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(
    reference: str,
    candidate: str,
    inputs_path: str | None,
    provider: str,
    exact: bool,
    seed: int,
    dims: tuple[str, ...],
    int_range: str | None,
    min_sqnr: float | None,
    min_cosine: float | None,
    per_layer: bool,
    top: int,
    as_json: bool,
) -> None:
    """Compare CAND (ONNX) with REF (ONNX model, or a PyTorch SPEC for a cross-framework check).

    \b
    Without --inputs, inputs are generated from CAND's input specs (seeded): floats standard
    normal; integers in [0, rows) when they index an embedding table, else [0, 16) (set with
    --int-range); symbolic dimensions 2 for batch, else 16 (set with --dim). The inputs used
    are printed. Without --min-sqnr/--min-cosine nothing is checked: the verdict is
    "no thresholds given" (exit 0 unless an output is not finite).
    """
    from ox_quant.commands._display import console as make_console
    from ox_quant.commands._display import db, fmt, metrics_table, quiet_torch
    from ox_quant.core.jsonify import to_jsonable
    from ox_quant.export.spec import looks_like_onnx
    from ox_quant.verification.inputs import parse_dim, parse_int_range
    from ox_quant.verification.verify import verify

    with quiet_torch(load=not looks_like_onnx(reference)), contextlib.redirect_stdout(sys.stderr):
        report = verify(
            reference,
            candidate,
            inputs=inputs_path,
            provider=provider,
            exact=exact,
            seed=seed,
            dims=dict(parse_dim(d) for d in dims),
            int_range=parse_int_range(int_range) if int_range else None,
            min_sqnr_db=min_sqnr,
            min_cosine=min_cosine,
            per_layer=per_layer,
        )
    if as_json:
        payload = to_jsonable(report)
        payload["passed"] = report.passed if report.checked else None
        payload["verdict"] = report.verdict
        payload["per_layer"] = payload.pop("layers")
        click.echo(json.dumps(payload))
    else:
        console = make_console()
        source = report.inputs[0].source if report.inputs else "none"
        console.print(f"inputs ({source}" + (f", seed {report.seed}" if source == "generated" else "") + "):",
                      highlight=False)
        for info in report.inputs:
            console.print(f"  {info.describe()}", highlight=False)
        title = f"{report.candidate} vs {report.reference} ({report.reference_kind}) on {report.provider}"
        console.print(metrics_table(title, report.outputs))
        if report.provider_check:
            console.print(metrics_table("candidate on CUDA vs on CPU", report.provider_check))
        if report.layers is not None:
            table = Table(title=f"per-layer error, worst {min(top, len(report.layers.layers))} of "
                                f"{len(report.layers.layers)} (each weight or activation quantized alone)", title_justify="left")
            for column in ("weight", "format", "bits", "shape", "weight SQNR dB", "output SQNR dB", "output cosine"):
                table.add_column(column, justify="left" if column in ("weight", "format") else "right")
            for layer in report.layers.layers[:top]:
                table.add_row(layer.weight, layer.format, str(layer.bits), "x".join(map(str, layer.shape)),
                              db(layer.weight_sqnr_db), db(layer.output_sqnr_db), fmt(layer.output_cosine, 6))
            console.print(table)
            for miss in report.layers.unmatched:
                console.print(f"not attributed: {miss.candidate_weight}: {miss.reason}", highlight=False)
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        if report.verdict == "no thresholds given":
            console.print("no thresholds given: nothing checked (pass --min-sqnr DB or --min-cosine C for a verdict)",
                          highlight=False)
        else:
            console.print(report.verdict.upper(), highlight=False)
    if not report.passed:
        raise OxQuantError("verification failed: " + "; ".join(report.failures))
