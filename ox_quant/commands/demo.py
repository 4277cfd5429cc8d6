"""``ox-quant demo``: the whole job on the built-in example model, no download needed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the example model and its quantized form in this folder "
                   "(default: a temporary folder, removed afterwards).")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--block-size", type=int, default=128, show_default=True, help="-1 = per-channel.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def demo_cmd(out_dir: str | None, bits: int, block_size: int, as_json: bool) -> None:
    """Build the example model (LLM-shaped MatMul blocks, seeded weights), convert it
    like `ox-quant convert model.onnx --block-size 128`, and verify it on ONNX Runtime.

    Outputs go to a temporary folder that is removed afterwards, unless --out DIR keeps them."""
    if out_dir is not None:
        _run_demo(Path(out_dir), True, bits, block_size, as_json)
        return
    with tempfile.TemporaryDirectory(prefix="ox-quant-demo-") as tmp:
        _run_demo(Path(tmp), False, bits, block_size, as_json)


def _run_demo(folder: Path, kept: bool, bits: int, block_size: int, as_json: bool) -> None:
    from ox_quant.commands.convert import format_bytes, resolve_granularity
    from ox_quant.core.config import QuantConfig
    from ox_quant.ir.examples import llm_shaped_model
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.verification.verify import verify

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "example.onnx"
    llm_shaped_model(model)
    config = QuantConfig(bits=bits, granularity=resolve_granularity(None, block_size))
    report = convert(model, None, ConvertOptions(config=config))
    checked = verify(model, report.output, per_layer=True)
    metrics = checked.outputs[0]
    worst = checked.layers.layers[:3] if checked.layers is not None else ()
    if as_json:
        click.echo(json.dumps({
            "kept": kept,
            "model": str(model) if kept else None,
            "output": str(report.output) if kept else None,
            "config": config.describe(),
            "quantized": len(report.quantized),
            "bits_per_weight": report.bits_per_weight,
            "input_bytes": report.input_bytes,
            "output_bytes": report.output_bytes,
            "sqnr_db": metrics.sqnr_db,
            "cosine": metrics.cosine,
            "worst_layers": [{"weight": layer.weight, "output_sqnr_db": layer.output_sqnr_db} for layer in worst],
        }))
        return
    click.echo(f"example model: {model.name} ({format_bytes(report.input_bytes)})")
    click.echo(f"converted ({config.describe()}): {report.output.name} ({format_bytes(report.output_bytes)}), "
               f"{len(report.quantized)} weights, {report.bits_per_weight:.3f} bits per weight, "
               f"format {', '.join(sorted({q.format for q in report.quantized}))}")
    click.echo(f"ONNX Runtime CPU, quantized vs float: SQNR {metrics.sqnr_db:.1f} dB, cosine {metrics.cosine:.5f}")
    for layer in worst:
        click.echo(f"  {layer.weight}: output SQNR {layer.output_sqnr_db:.1f} dB when quantized alone")
    if kept:
        click.echo(f"outputs kept in {folder}")
    else:
        click.echo("outputs removed (pass --out DIR to keep them)")
