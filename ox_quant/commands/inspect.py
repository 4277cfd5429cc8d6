"""``ox-quant inspect``: describe the quantized weights of a model."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect_cmd(model: str, as_json: bool) -> None:
    """Describe the quantized weights of MODEL (any tool's MatMulNBits/QDQ model)."""
    from ox_quant.commands.convert import format_bytes
    from ox_quant.pipeline.inspect import inspect_model

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(info.opsets.items()))
    console.print(f"{info.path}: IR {info.ir_version}, opsets {opsets}, {info.num_nodes} nodes, {format_bytes(info.model_bytes)}")
    if info.quantized:
        table = Table(title=f"{len(info.quantized)} quantized weights", title_justify="left")
        for column in ("weight", "op", "format", "shape", "bits", "granularity", "sym", "bpw"):
            table.add_column(column)
        for q in info.quantized:
            gran = q.granularity + (f":{q.block_size}" if q.block_size and q.block_size > 0 else "")
            table.add_row(
                q.name, q.op, q.format, "x".join(map(str, q.shape)), str(q.bits), gran,
                "yes" if q.symmetric else "no", f"{q.bits_per_weight:.3f}",
            )
        console.print(table)
        console.print(f"{info.bits_per_weight:.3f} bits per quantized weight")
    else:
        console.print("no quantized weights")
    inits = info.float_weights - info.float_constants
    console.print(f"{info.float_weights} float tensors left as float ({inits} initializers, "
                  f"{info.float_constants} in Constant nodes), {format_bytes(info.float_weight_bytes)}")
