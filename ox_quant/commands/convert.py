"""``ox-quant convert``: quantize the weights of an ONNX model."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ox_quant.core.config import (
    DEFAULT_ALGORITHM,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SYMMETRIC,
    PER_CHANNEL_BLOCK_SIZE,
    Format,
    QuantConfig,
    SymmetricRule,
    resolve_granularity,
)
from ox_quant.errors import OxQuantError

if TYPE_CHECKING:
    from ox_quant.pipeline.convert import ConvertReport, QuantizedEntry

def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def print_summary(report: ConvertReport, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from ox_quant.pipeline.convert import group_skips

    console = Console(highlight=False, soft_wrap=True)
    if report.quantized:
        table = Table(title=f"{len(report.quantized)} weights quantized", title_justify="left")
        # "shape" is the tensor as stored (what `inspect` shows); "[K, N]" the matrix view that
        # scales are laid out on, shown when it differs for some weight (Conv, transB=1 Gemm).
        kn_view = any(tuple(q.stored_shape) != tuple(q.shape) for q in report.quantized)
        columns = ("weight", "op", "shape") + (("[K, N]",) if kn_view else ()) + ("config", "format", "bpw")
        for column in columns:
            table.add_column(column, justify="right" if column == "bpw" else "left")
        rows = report.quantized if len(report.quantized) <= 40 else report.quantized[:40]
        for q in rows:
            config = f"int{q.bits} {q.granularity}" + (f":{q.block_size}" if q.block_size and q.block_size > 0 else "")
            config += "" if q.symmetric else " asym"
            shapes = ["x".join(map(str, q.stored_shape))] + (["x".join(map(str, q.shape))] if kn_view else [])
            table.add_row(q.name, q.op, *shapes, config, q.format, f"{q.bits_per_weight:.3f}")
        if len(report.quantized) > len(rows):
            table.add_row(f"... {len(report.quantized) - len(rows)} more", *[""] * (len(columns) - 1))
        console.print(table)
        reasons = sorted({f"{q.format}: {q.format_reason}" for q in report.quantized})
        for reason in reasons:
            console.print(f"  format {reason}")
        for line in config_reasons(report.quantized):
            console.print(f"  config {line}")
    else:
        console.print("no weights quantized")
    if report.policy:
        console.print(f"default policy: {report.policy}")
    print_calibration(console, report)
    print_activations(console, report)
    if report.skipped:
        console.print(f"{len(report.skipped)} left as they are (--json lists each):")
        for group in group_skips(report.skipped):
            more = f", ... (+{group.count - len(group.names)})" if group.count > len(group.names) else ""
            console.print(f"  {group.count:>4}  {group.reason}: {', '.join(group.names)}{more}")
    if report.merged:
        removed = sum(len(g.nodes) - 1 for g in report.merged)
        console.print(f"merged {len(report.merged)} groups of sibling MatMulNBits ({removed} fewer kernels; "
                      "--no-merge-siblings keeps one node per weight)")
    for change in report.version_changes:
        console.print(f"note: {change.describe()}")
    bpw = report.bits_per_weight
    console.print(
        f"size {format_bytes(report.input_bytes)} -> {format_bytes(report.output_bytes)}"
        + (f", {bpw:.3f} bits per quantized weight" if bpw is not None else "")
        + f", {elapsed:.1f} s"
    )
    console.print(f"wrote {report.output}" + (f" (+ {report.external_data.name})" if report.external_data else ""))


def token_encoder(value: str):
    """The encoder ``--tokenizer`` names: a ``tokenizer.json`` file, or a registered model's tokenizer."""
    from pathlib import Path

    from ox_quant.calibration.feeds import tokenizer_file

    if Path(value).is_file():
        return tokenizer_file(value)
    import importlib

    from ox_quant_models import REGISTRY

    if value not in REGISTRY:
        raise OxQuantError(f"--tokenizer {value!r} is neither a file nor a registered model "
                           f"({', '.join(sorted(REGISTRY))})")
    module = importlib.import_module(REGISTRY[value].split(":")[0])
    make = getattr(module, "tokenizer", None)
    if make is None:
        raise OxQuantError(f"registered model {value!r} has no tokenizer: give --tokenizer FILE")
    tok = make()

    def encode(text: str) -> list[int]:
        try:
            return list(tok.encode(text, add_special_tokens=False).ids)
        except TypeError:  # a tokenizer without that argument
            return list(tok.encode(text).ids)

    return encode


def calibration_source(path: str, tokenizer: str | None, samples: int | None, seq_len: int | None):
    """``--calibration`` and its companions as ``ConvertOptions.calibration_data`` (feeds made, and
    checked, from the model convert loads; the tokenizer is resolved first)."""
    from ox_quant.calibration.feeds import calibration_feeds

    encode = token_encoder(tokenizer) if tokenizer is not None else None

    def make(model):
        return calibration_feeds(path, model, samples=samples, seq_len=seq_len, encode=encode)

    return make


def print_activations(console, report: ConvertReport) -> None:
    """Activations quantized, how, what ONNX Runtime fused them into, and what stayed float."""
    if not report.activation_mode:
        return
    from ox_quant.pipeline.convert import group_skips

    feeds = f", {report.calibration_feeds} calibration feed(s)" if report.calibration_feeds else ""
    console.print(f"activations: {len(report.activations)} tensor(s) quantized, {report.activation_mode}{feeds}")
    for entry in report.activations[:8]:
        detail = f" scale {entry.scale:.4g} zero point {entry.zero_point}" if entry.scale is not None else ""
        console.print(f"  {entry.tensor} -> {entry.ops}: {entry.how}{detail}")
    if len(report.activations) > 8:
        console.print(f"  ... {len(report.activations) - 8} more (--json lists each)")
    for smoothed in report.smoothed[:4]:
        console.print(f"  SmoothQuant {smoothed.tensor}: s in [{smoothed.min_scale:.3g}, {smoothed.max_scale:.3g}], "
                      f"{smoothed.how}")
    kernels = ", ".join(f"{op} x{n}" for op, n in report.kernels) or "none (the pattern is not fused: runs as float ops)"
    console.print(f"  ONNX Runtime CPU integer kernels in the optimized graph: {kernels}")
    for group in group_skips(list(report.activation_skips)):
        console.print(f"  {group.count:>4}  {group.reason}: {', '.join(group.names)}")


def print_calibration(console, report: ConvertReport) -> None:
    """One line on the calibration stage and the mean calibration error, RTN vs the algorithms."""
    info = report.calibration
    if not info:
        return
    rows = [q.calibration for q in report.quantized if q.calibration is not None and q.calibration.error is not None]
    line = (f"calibration: {info['source']}; {info['schedule']}, {info['passes']} pass(es), "
            f"{float(info['seconds']):.1f} s")  # type: ignore[arg-type]
    if rows:
        rtn = sum(r.error_rtn or 0.0 for r in rows) / len(rows)
        err = sum(r.error or 0.0 for r in rows) / len(rows)
        algos = ", ".join(sorted({r.algorithm for r in rows}))
        kinds = "/".join(sorted({r.error_kind or "" for r in rows}))
        line += f"; mean {kinds} error over {len(rows)} weights: rtn {rtn:.3e} -> {algos} {err:.3e}"
    console.print(line)


def config_reasons(quantized: Sequence[QuantizedEntry]) -> list[str]:
    """``int8 channel x12 (Conv): default policy: ...``: each config, its weights' ops and why."""
    groups: dict[tuple[str, str], list[str]] = {}
    for q in quantized:
        config = f"int{q.bits} {q.granularity}" + (f":{q.block_size}" if q.block_size and q.block_size > 0 else "")
        groups.setdefault((config, q.config_reason), []).append(q.op)
    lines = []
    for (config, why), ops in sorted(groups.items()):
        kinds = ", ".join(sorted(set(ops)))
        lines.append(f"{config} x{len(ops)} ({kinds}): {why}")
    return lines


@click.command("convert")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output model (default: beside INPUT, named after the config); a folder when INPUT is an LLM folder.")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per code of MatMul weights, 2 to 8.")
@click.option("--gemm-bits", metavar="float|bits|2-8", default=None,
              help="Gemm weights: float (default, as ONNX Runtime's quantizer), bits (follow --bits, with the MatMul config) or a width.")
@click.option("--conv-bits", metavar="float|bits|2-8", default=None,
              help="Conv weights, per output channel: float (default), bits (follow --bits) or a width; 8 is safe, 4 breaks CNNs.")
@click.option("--embedding-bits", metavar="float|bits|2-8", default=None,
              help="Embedding tables (Gather, tied tables): float (default), bits (follow --bits) or a width; 8 is safe.")
@click.option("--block-size", type=int, default=None, help=f"Block size along K (default {DEFAULT_BLOCK_SIZE}); {PER_CHANNEL_BLOCK_SIZE} = per-channel. Alone, implies --granularity block.")
@click.option(
    "--granularity",
    metavar="tensor|channel|block[:B]|channel-group[:G]",
    default=None,
    help="How scales are shared (block and channel-group take their size from --block-size).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in Format]),
    default="auto",
    show_default=True,
    help="auto: per weight, MatMulNBits (GatherBlockQuantized for embeddings) where ONNX Runtime's CPU "
    "kernels accept the config, else QDQ (DequantizeLinear; always for Conv), else ox-quant's "
    "custom op (e.g. 3, 5-7 bits; needs its library at run time). matmulnbits|qdq|custom: that format only; "
    "a weight it cannot hold stays float and is listed as skipped (exit 1 if it can hold none).",
)
@click.option("--symmetric/--asymmetric", default=DEFAULT_SYMMETRIC, show_default=True,
              help="Zero point fixed at mid-range (no zero points stored), or fitted to each group's [min, max] "
              "(default: the same codes as ONNX Runtime's MatMulNBitsQuantizer, whose default it is; "
              "the symmetric rules fall below it on some models, docs/defaults.md).")
@click.option(
    "--symmetric-rule",
    type=click.Choice([r.value for r in SymmetricRule]),
    default=SymmetricRule.MIN_ERROR.value,
    show_default=True,
    help="Symmetric scale per group: min-error = lowest squared error of signed, absmax and the tightest "
    "unclipped signed scale (never worse than either); min-error-clip = the same plus clipped scales "
    "(lower weight error, worse on some models); signed = ONNX Runtime's -w_ext/2^(bits-1), all 2^bits "
    "levels (same bytes as its quantizer); absmax = absmax/(2^(bits-1)-1), no clipping, one level unused.",
)
@click.option("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy_level (0-4; 4 = int8 activations, fastest on CPU). Default: not written.")
@click.option("--algorithm", default=DEFAULT_ALGORITHM, show_default=True, help="Quantization algorithm: rtn (round to nearest), gptq (error compensation on the Hessian, "
              "act-order; needs --calibration), gptq-noact, awq (activation-aware input scales and "
              "clipping; needs --calibration).")
@click.option("--calibration", "calibration", type=click.Path(), default=None, metavar="PATH",
              help="Calibration data: an .npz of one feed (as verify --inputs), a directory of .npz feeds, or a UTF-8 "
              "text file (with --tokenizer) cut into token windows. Gathers per-weight activation statistics "
              "for the algorithm and reports each weight's calibration error (RTN vs --algorithm) in --json.")
@click.option("--tokenizer", default=None, metavar="FILE|MODEL",
              help="Tokenizer for a text --calibration: a tokenizer.json file or a registered model's name.")
@click.option("--calibration-samples", type=int, default=None, metavar="N",
              help="Feeds used (text: windows; default 32; .npz directory: the first N files, default all).")
@click.option("--calibration-seq-len", type=int, default=None, metavar="L",
              help="Tokens per text window (default 256).")
@click.option("--activations", "activations", type=click.Choice(["int8", "uint8", "dynamic"]), default=None,
              help="Also quantize the activation inputs of the quantized MatMul/Gemm/Conv: uint8/int8 static "
              "(ranges from --calibration), dynamic (DynamicQuantizeLinear at run time). Weights default to "
              "int8 per channel (asymmetric) as QDQ, so that ONNX Runtime fuses them into its integer kernels.")
@click.option("--calibrate", "calibrate", default="minmax", show_default=True, metavar="minmax|percentile:P|entropy|mse",
              help="How static activation ranges are chosen from the calibration histograms.")
@click.option("--activation-granularity", type=click.Choice(["tensor", "channel", "token"]), default="tensor",
              show_default=True, help="One activation scale per tensor, per input channel (min-max; no fused "
              "ONNX Runtime kernel), or per token (dynamic, symmetric int8; no fused kernel).")
@click.option("--smooth-alpha", type=float, default=None, metavar="A",
              help="SmoothQuant before quantizing: s = max|X|^A / max|W|^(1-A) per input channel, folded into "
              "the op before (needs --calibration).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip weights or nodes whose name matches (repeatable).")
@click.option("--include", multiple=True, metavar="REGEX", help="Quantize only weights or nodes whose name matches (repeatable).")
@click.option("--include-op", multiple=True, metavar="OP", help="Quantize only weights of these ops: MatMul, Gemm, Gather, Conv (repeatable; default all).")
@click.option("--exclude-op", multiple=True, metavar="OP", help="Leave weights of these ops alone (repeatable).")
@click.option("--min-elements", type=int, default=0, show_default=True, help="Skip weights with fewer elements.")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None, help="JSON/YAML file of per-weight rules (bits, block size, format, skip) for mixed precision.")
@click.option("--external-data/--single-file", "external_data", default=None,
              help="Weights in OUTPUT.data beside the model, or inside the .onnx (default: external from 32 MiB of "
              "weights, or when the input's are: ONNX Runtime memory-maps the file instead of copying the weights "
              "onto its heap, about a third of the peak memory; one file holds at most 2 GiB).")
@click.option("--merge-siblings/--no-merge-siblings", "merge_siblings", default=None,
              help="Write MatMulNBits weights that read the same input (a decoder's q/k/v, gate/up) as one node "
              "of their stacked rows, split after: the same bytes, fewer kernels (default: on for an LLM folder, "
              "off for a model file).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the summary.")
def convert(
    input_path: str,
    output: str | None,
    bits: int,
    gemm_bits: str | None,
    conv_bits: str | None,
    embedding_bits: str | None,
    block_size: int | None,
    granularity: str | None,
    fmt: str,
    symmetric: bool,
    symmetric_rule: str,
    accuracy_level: int | None,
    algorithm: str,
    calibration: str | None,
    tokenizer: str | None,
    calibration_samples: int | None,
    calibration_seq_len: int | None,
    activations: str | None,
    calibrate: str,
    activation_granularity: str,
    smooth_alpha: float | None,
    exclude: tuple[str, ...],
    include: tuple[str, ...],
    include_op: tuple[str, ...],
    exclude_op: tuple[str, ...],
    min_elements: int,
    recipe: str | None,
    external_data: bool | None,
    merge_siblings: bool | None,
    as_json: bool,
) -> None:
    """Quantize the weights of the ONNX model INPUT (MatMul, Gemm, Gather, Conv).

    \b
    Default policy (chosen by measurement, docs/defaults.md):
      MatMul:       --bits (4), blocks of --block-size (128) along K,
                    asymmetric (--symmetric: no zero points, --symmetric-rule)
      Gemm:         float, as ONNX Runtime's quantizer; --gemm-bits bits
                    quantizes them like MatMul weights
      Conv:         float; --conv-bits 8 quantizes them per output channel
      embeddings:   float; --embedding-bits 8 quantizes them in blocks of
                    --block-size (Gather tables, tables tied to a MatMul)
    4-bit Conv and embeddings break models; int8 is close but not free.
    --symmetric/--asymmetric and --format apply to all. A recipe rule
    applies on top of these (bits: 8 quantizes a Conv). A width no format
    holds for an op (a 3-bit Conv) is raised to 4 or 8, not left float.

    \b
    Example: ox-quant convert model.onnx --block-size 128
    writes model.int4-block128.onnx (4-bit, blocks of 128 along K).
    """
    from ox_quant.pipeline.convert import ConvertOptions
    from ox_quant.pipeline.convert import convert as run_convert
    from ox_quant.pipeline.policy import (
        DEFAULT_CONV_BITS,
        DEFAULT_EMBEDDING_BITS,
        DEFAULT_GEMM_BITS,
        Policy,
        parse_width,
    )
    from ox_quant.pipeline.selection import Selection, load_recipe, resolve_ops

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)

    act_options = None
    if activations is not None:
        from ox_quant.core.calibrate import parse_calibrator
        from ox_quant.pipeline.activations import ActivationOptions

        act_options = ActivationOptions(mode=activations, calibrator=parse_calibrator(calibrate),
                                        granularity=activation_granularity, smooth_alpha=smooth_alpha)
        if act_options.needs_feeds and calibration is None:
            raise OxQuantError(f"--activations {activations}"
                               + (" --smooth-alpha" if smooth_alpha is not None else "")
                               + " needs calibration data: --calibration PATH (.npz, a folder of .npz, or a text "
                               "with --tokenizer)")
        # W8A8 unless asked otherwise: int8 per-channel QDQ weights (what ONNX Runtime fuses)
        if not given("bits"):
            bits = 8
        if not given("granularity") and not given("block_size"):
            granularity = "channel"
        if not given("fmt"):
            fmt = "qdq"
    else:
        for name, flag in (("calibrate", "--calibrate"), ("activation_granularity", "--activation-granularity"),
                           ("smooth_alpha", "--smooth-alpha")):
            if given(name):
                raise OxQuantError(f"{flag} applies to activation quantization: add --activations int8|uint8|dynamic")
    config = QuantConfig(
        bits=bits,
        granularity=resolve_granularity(granularity, block_size),
        symmetric=symmetric,
        symmetric_rule=SymmetricRule(symmetric_rule),
        format=Format(fmt),
        accuracy_level=accuracy_level,
        algorithm=algorithm,
    )
    if min_elements < 0:
        raise OxQuantError(f"--min-elements must be >= 0, got {min_elements}")
    selection = Selection(
        include=include,
        exclude=exclude,
        include_ops=resolve_ops(include_op, exclude_op),
        min_elements=min_elements,
        rules=load_recipe(recipe) if recipe else (),
    )
    policy = Policy(
        conv_bits=DEFAULT_CONV_BITS if conv_bits is None else parse_width(conv_bits, "--conv-bits"),
        embedding_bits=(DEFAULT_EMBEDDING_BITS if embedding_bits is None
                        else parse_width(embedding_bits, "--embedding-bits")),
        gemm_bits=DEFAULT_GEMM_BITS if gemm_bits is None else parse_width(gemm_bits, "--gemm-bits"),
        explicit=frozenset(k for k, v in (("conv", conv_bits), ("embedding", embedding_bits), ("gemm", gemm_bits))
                           if v is not None),
    )
    calibration_data = None
    if calibration is not None:
        calibration_data = calibration_source(calibration, tokenizer, calibration_samples, calibration_seq_len)
    elif tokenizer is not None or calibration_samples is not None or calibration_seq_len is not None:
        raise OxQuantError("--tokenizer, --calibration-samples and --calibration-seq-len need --calibration PATH")
    options = ConvertOptions(config=config, selection=selection, policy=policy, calibration_data=calibration_data,
                             activations=act_options, external_data=external_data, merge_siblings=merge_siblings)

    def calibration_progress(line: str) -> None:
        if sys.stderr.isatty():  # as the quantizing bar: a log keeps only the one-line result
            click.echo(line, err=True)

    if not _is_dir(input_path) and output is not None and _is_dir(output):
        raise click.BadParameter(f"File '{output}' is a directory.", param_hint="'-o' / '--output'")  # exit 2
    copied: list[str] = []
    if _is_dir(input_path):  # an LLM folder: the model quantized, the other files copied
        from ox_quant.pipeline.folder import convert_folder

        if output is None:
            raise OxQuantError(f"{input_path} is a folder: give the output folder with -o DIR")
        started = time.perf_counter()
        report, copied = convert_folder(input_path, output, options, calibration_progress=calibration_progress)
        if as_json:
            click.echo(json.dumps({**report.as_dict(), "folder": output, "copied": copied}))
        else:
            print_summary(report, time.perf_counter() - started)
            print(f"copied {', '.join(copied) or 'nothing'} into {output}")
        return
    started = time.perf_counter()
    show_progress = sys.stderr.isatty()
    if show_progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("quantizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task("", total=None)

            def progress(name: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=name)

            report = run_convert(input_path, output, options, progress, calibration_progress)
    else:
        report = run_convert(input_path, output, options, calibration_progress=calibration_progress)
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        print_summary(report, elapsed)


def _is_dir(path: str) -> bool:
    """``Path(path).is_dir()``, False where the name itself is unusable (too long, ...)."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False
