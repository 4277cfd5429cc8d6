"""``ox-quant study MODEL``: which granularity and how many bits, and what it costs, measured."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ox_quant.core.config import Format, SymmetricRule
from ox_quant.errors import OxQuantError

if TYPE_CHECKING:
    from ox_quant.study.run import Scheduler


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers while the study runs (the peer warns about opsets it upgrades)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _command_line() -> str:
    return "ox-quant " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _scheduler(address: str | None, ray_cpus: int | None, row_cpus: float | None, max_retries: int | None,
               row_timeout: float | None) -> Scheduler:
    """The sequential scheduler, or the Ray one with the given settings (Ray-only flags need --ray)."""
    from ox_quant.study.run import sequential

    if address is None:
        given = [name for name, v in (("--ray-cpus", ray_cpus), ("--row-cpus", row_cpus), ("--max-retries", max_retries),
                                      ("--row-timeout", row_timeout)) if v is not None]
        if given:
            raise OxQuantError(f"{', '.join(given)} only apply with --ray")
        return sequential
    if ray_cpus is not None and address != "local":
        raise OxQuantError(f"--ray-cpus only applies with --ray local, not --ray {address}")
    from ox_quant.study.ray_scheduler import RayScheduler, import_ray

    import_ray()  # one line now when Ray is missing, not after the fp32 export
    return RayScheduler(address=address, row_cpus=1.0 if row_cpus is None else row_cpus,
                        max_retries=2 if max_retries is None else max_retries,
                        row_timeout=3600.0 if row_timeout is None else row_timeout, local_cpus=ray_cpus)


@click.command("study")
@click.argument("model", metavar="MODEL")
@click.option("--bits", "bits_text", default="8,4,3,2", show_default=True, help="Bit widths, comma-separated.")
@click.option("--granularity", "granularity_text", metavar="LIST", show_default=True,
              default="tensor,channel-group:128,channel,block:256,block:128,block:64,block:32",
              help="Granularities, comma-separated: tensor, channel, block:B, channel-group:G.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in Format]), default="auto", show_default=True,
              help="Format for ox-quant's rows (auto: MatMulNBits, else QDQ, else ox-quant's custom op).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True)
@click.option("--symmetric-rule", type=click.Choice([r.value for r in SymmetricRule]), default=SymmetricRule.MIN_ERROR.value,
              show_default=True, help="Symmetric scale rule for ox-quant's rows (see convert --help).")
@click.option("--include-op", multiple=True, metavar="OP",
              help="Quantize weights of these ops only (repeatable; default MatMul, Gemm, Conv: embedding tables stay float).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Also run ONNX Runtime's MatMulNBitsQuantizer on each configuration.")
@click.option("--algorithm", "algorithm_text", default="", metavar="LIST",
              help="ox-quant algorithms with a row each per configuration, comma-separated (rtn, mse, hqq, gptq, "
                   "awq, ...: convert --help); those that need calibration get the model's calibration feeds, "
                   "from a source its task does not score.")
@click.option("--peer-method", "peer_method_text", default="", metavar="LIST",
              help="MatMulNBitsQuantizer methods with a row each per configuration, comma-separated: default, rtn, "
                   "hqq, k_quant, gptq, nvidia_awq, or 'all'. Each conversion (ours too) runs in its own process: "
                   "wall time and peak RSS per row.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration feeds for the algorithm rows (SmolLM2: token windows; MiniLM: batches of 4 sentences).")
@click.option("--calibration-seq-len", type=click.IntRange(min=2), default=256, show_default=True,
              help="Tokens per calibration window (MiniLM: at most).")
@click.option("--only", "only_text", default="", metavar="LIST",
              help="Run only these of --bits x --granularity, comma-separated BITS:GRANULARITY "
                   "(e.g. 4:block:128,4:block:32,3:block:128,2:block:32).")
@click.option("--keep-models", is_flag=True, help="Keep the converted ONNX files (deleted by default).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: study-MODEL).")
@click.option("--text", type=click.Path(dir_okay=False), help="smollm2: UTF-8 text file for perplexity.")
@click.option("--tokens", "max_tokens", type=click.IntRange(min=2), help="smollm2: tokens to read (task default 2048).")
@click.option("--context", type=click.IntRange(min=2), help="smollm2: window length in tokens (task default 512).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print study.json's content on stdout.")
@click.option("--report-only", is_flag=True,
              help="Run nothing: write study.md and the plots again from --out's study.json (claims re-evaluated).")
@click.option("--resume", is_flag=True,
              help="Keep the rows of --out's study.json with the same configuration, model hash and ox-quant "
                   "version; measure the others.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[auto|local|ADDRESS]",
              help="Measure rows as Ray tasks: local (a Ray instance of this process; the default of a bare --ray), "
                   "auto (the cluster `ray start` runs here) or a cluster address. --out must be on a path every "
                   "node sees (docs/ray.md). Needs pip install 'ox-quant[ray]'.")
@click.option("--ray-cpus", type=click.IntRange(min=1), default=None,
              help="--ray local: CPUs of the local Ray instance (default: all).")
@click.option("--row-cpus", type=click.FloatRange(min=0.01), default=None,
              help="--ray: CPUs each row reserves (default 1).")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="--ray: times a row whose worker died is run again (default 2).")
@click.option("--row-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="--ray: a row running longer is cancelled and marked failed (default 3600).")
def study_cmd(model: str, bits_text: str, granularity_text: str, fmt: str, symmetric: bool, symmetric_rule: str,
              include_op: tuple[str, ...], peer: bool, algorithm_text: str, peer_method_text: str,
              calibration_samples: int, calibration_seq_len: int, only_text: str, keep_models: bool, out_dir: str | None,
              text: str | None, max_tokens: int | None, context: int | None, provider: str, as_json: bool,
              report_only: bool, resume: bool, ray_address: str | None, ray_cpus: int | None, row_cpus: float | None,
              max_retries: int | None, row_timeout: float | None) -> None:
    """Convert MODEL under every bit width x granularity, score each on its task, write the report.

    \b
    MODEL: minilm, smollm2, crepe-tiny or ppocr-rec (tools/setup_models.sh installs them).
    Writes study.md (tables and the claims), study.json and PNG plots into --out.
    Example: ox-quant study minilm --bits 8,4 --granularity channel,block:128 --out study-minilm
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ox_quant.algorithms.registry import get_quantizer
    from ox_quant.commands._display import quiet_torch
    from ox_quant.pipeline.selection import resolve_ops
    from ox_quant.study.algorithms import PEER_METHODS
    from ox_quant.study.report import result_dict, write_report
    from ox_quant.study.rows import DEFAULT_OPS, StudyOptions, parse_bits_list, parse_granularity_list, parse_only
    from ox_quant.study.run import run_study
    from ox_quant_models.tasks import TASKS, study_facts

    study_facts(model)  # unknown model: one line naming the models a study runs on
    algorithms = tuple(a.strip() for a in algorithm_text.split(",") if a.strip())
    for name in algorithms:
        get_quantizer(name)  # unknown: one line naming the choices
    methods = PEER_METHODS if peer_method_text.strip() == "all" else \
        tuple(m.strip() for m in peer_method_text.split(",") if m.strip())
    unknown = [m for m in methods if m not in PEER_METHODS]
    if unknown:
        raise OxQuantError(f"--peer-method {', '.join(unknown)}: choose from {', '.join(PEER_METHODS)} or all")
    task_options = tuple((k, v) for k, v in (("text", text), ("max_tokens", max_tokens), ("context", context))
                         if v is not None)
    unsupported = sorted({k for k, _ in task_options} - set(TASKS[model].options))
    if unsupported:
        flags = ", ".join("--" + ("tokens" if o == "max_tokens" else o) for o in unsupported)
        raise OxQuantError(f"{flags} only apply to smollm2, not {model}")
    options = StudyOptions(
        model=model,
        bits=parse_bits_list(bits_text),
        granularities=parse_granularity_list(granularity_text),
        symmetric=symmetric,
        symmetric_rule=SymmetricRule(symmetric_rule),
        format=Format(fmt),
        include_ops=resolve_ops(include_op, ()) if include_op else DEFAULT_OPS,
        peer=peer,
        keep_models=keep_models,
        task_options=task_options,
        provider=provider,
        algorithms=algorithms,
        peer_methods=methods,
        calibration_samples=calibration_samples,
        calibration_seq_len=calibration_seq_len,
        only=parse_only(only_text),
    )
    out = Path(out_dir) if out_dir else Path(f"study-{model}")
    scheduler = _scheduler(ray_address, ray_cpus, row_cpus, max_retries, row_timeout)
    if out.exists() and not out.is_dir():
        raise OxQuantError(f"--out {out} exists and is not a directory")
    if report_only:
        from ox_quant.study.report import load_result

        saved = out / "study.json"
        if not saved.is_file():
            raise OxQuantError(f"--report-only: {saved} does not exist")
        data = json.loads(saved.read_text(encoding="utf-8"))
        if data.get("model") != model:
            raise OxQuantError(f"--report-only: {saved} is a study of {data.get('model')!r}, not {model!r}")
        paths = write_report(load_result(saved), out, data.get("command"))
        click.echo("wrote " + ", ".join(str(p) for p in paths))
        return
    stderr = Console(stderr=True)
    with _quiet_loggers("onnxruntime.quantization", "onnx_ir"), quiet_torch(load=model != "ppocr-rec"), contextlib.redirect_stdout(sys.stderr), \
            Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     TextColumn("{task.description}"), console=stderr, transient=True,
                     disable=not stderr.is_terminal) as bar:
        handle = bar.add_task("", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(handle, completed=done, total=total, description=stage)

        result = run_study(options, out, progress, scheduler=scheduler, resume=resume)
    command = _command_line()
    paths = write_report(result, out, command)
    if as_json:
        click.echo(json.dumps(result_dict(result, command), default=str))
        return
    console = Console(soft_wrap=True, highlight=False)
    m = result.metric
    console.print(f"[bold]{model}[/bold]: fp32 {m.name} {result.fp32.value:.6g} ({m.direction}); "
                  f"{len(result.rows)} configurations in {result.seconds:.0f} s")
    for c in result.claims:
        console.print(f"  {c.verdict:>14}  {c.statement}  [dim]{c.evidence}[/dim]")
    console.print("wrote " + ", ".join(str(p) for p in paths))
