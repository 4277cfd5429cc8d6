"""``convert``: load -> plan -> rewrite -> save, and a report of what was done.

The input model and its external data are never modified: the output is written under
a temporary name beside its destination and renamed into place.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from ox_quant.config import Format, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats import FormatChoice, check_granularity_fits, choose_format, granularity_block_size
from ox_quant.modelio import (
    EXTERNAL_DATA_THRESHOLD,
    MAX_IR_VERSION,
    external_files,
    initializer_bytes,
    load_model,
    model_bytes,
    save_model_atomically,
)
from ox_quant.sites import Skip, WeightSite, find_sites
from ox_quant.writers import MS_DOMAIN, matmulnbits_shapes, qdq_layout, write_matmulnbits, write_qdq

QDQ_MIN_OPSET = 21  # INT4/UINT4 and block_size on DequantizeLinear


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the paths."""

    config: QuantConfig = field(default_factory=QuantConfig)
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizedEntry:
    """One quantized weight in the report."""

    name: str
    op: str
    shape: tuple[int, int]
    bits: int
    granularity: str
    block_size: int | None
    symmetric: bool
    format: str
    format_reason: str
    stored_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.shape[0] * self.shape[1])

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "bits": self.bits,
            "granularity": self.granularity,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "format": self.format,
            "format_reason": self.format_reason,
            "stored_bytes": self.stored_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
        }


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` did."""

    input: Path
    output: Path
    external_data: Path | None
    quantized: tuple[QuantizedEntry, ...]
    skipped: tuple[Skip, ...]
    input_bytes: int
    output_bytes: int

    @property
    def bits_per_weight(self) -> float | None:
        """All stored bytes of the quantized weights x 8 / their number of weights."""
        numel = sum(q.shape[0] * q.shape[1] for q in self.quantized)
        if not numel:
            return None
        return sum(q.stored_bytes for q in self.quantized) * 8 / numel

    def as_dict(self) -> dict[str, object]:
        bpw = self.bits_per_weight
        return {
            "input": str(self.input),
            "output": str(self.output),
            "external_data": str(self.external_data) if self.external_data else None,
            "quantized": [q.as_dict() for q in self.quantized],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "bits_per_weight": round(bpw, 4) if bpw is not None else None,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
        }


def stored_bytes(site: WeightSite, config: QuantConfig, choice: FormatChoice) -> int:
    """Bytes a quantized weight occupies in the output: codes + scales + zero points."""
    scale_bytes = 2 if site.dtype == "FLOAT16" else 4
    if choice.format is Format.MATMULNBITS:
        shapes = matmulnbits_shapes(site.k, site.n, config)
        total = math.prod(shapes["B"]) + math.prod(shapes["scales"]) * scale_bytes
        if "zero_points" in shapes:
            total += math.prod(shapes["zero_points"])
        return total
    _, param_shape = qdq_layout(site.k, site.n, config)
    params = math.prod(param_shape)
    code_bytes = math.ceil(site.numel * config.bits / 8)
    zp_bytes = 0 if config.symmetric else math.ceil(params * config.bits / 8)
    return code_bytes + params * scale_bytes + zp_bytes


def default_output_path(input_path: Path, config: QuantConfig) -> Path:
    """``model.onnx`` -> ``model.int4-block128.onnx`` (beside the input)."""
    tag = f"int{config.bits}-{str(config.granularity).replace(':', '')}"
    if not config.symmetric:
        tag += "-asym"
    if config.format is not Format.AUTO:
        tag += f"-{config.format.value}"
    return input_path.with_name(f"{input_path.stem}.{tag}.onnx")


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file (also through hard or symbolic links)."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _check_paths(input_path: Path, output: Path, model: ir.Model) -> None:
    out = output.resolve()
    data = out.with_name(out.name + ".data")
    if _same_file(out, input_path):
        raise OxQuantError(f"output path is the input model ({input_path.name}): choose another -o")
    if _same_file(data, input_path):
        raise OxQuantError(f"the output's external data file {data.name} would overwrite the input model: choose another -o")
    for path in external_files(model):
        if _same_file(out, path) or _same_file(data, path):
            raise OxQuantError(f"output would overwrite the input's external data file {path.name}: choose another -o")
    if out.is_dir():
        raise OxQuantError(f"output path {output} is a directory")
    parent = out.parent
    if not parent.exists():
        raise OxQuantError(f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise OxQuantError(f"output directory {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OxQuantError(f"output directory {parent} is not writable")


def _ensure_opset(model: ir.Model, needed: int) -> None:
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if current >= needed:
        return
    from onnxscript import version_converter

    try:
        version_converter.convert_version(model, target_version=needed)
    except Exception as exc:
        raise OxQuantError(
            f"QDQ output needs opset {needed} but the model is opset {current} and could not be upgraded "
            f"({type(exc).__name__}); try --format matmulnbits"
        ) from exc


def convert(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    options: ConvertOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ConvertReport:
    """Quantize the eligible weights of ``input_path`` and write the result.

    ``progress(weight_name, done, total)`` is called as each weight is quantized.
    Raises ``OxQuantError`` for bad input, impossible configurations or unwritable output.
    """
    options = options or ConvertOptions()
    config = options.config
    for pattern in options.exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OxQuantError(f"--exclude {pattern!r} is not a valid regular expression: {exc}") from None
    src = Path(input_path)
    model = load_model(src, runnable=True)
    out = Path(output_path) if output_path is not None else default_output_path(src, config)
    _check_paths(src, out, model)
    input_is_external = bool(external_files(model))

    sites, skips = find_sites(model.graph, options.exclude)
    plan: list[tuple[WeightSite, FormatChoice]] = []
    misfits: list[Skip] = []
    for site in sites:
        misfit = check_granularity_fits(config, site.k, site.n)
        if misfit:
            misfits.append(Skip(site.name, misfit))
            continue
        plan.append((site, choose_format(config, site.k, site.n, site.dtype)))
    if misfits and not plan:
        raise OxQuantError(f"{misfits[0].reason} for every weight (e.g. {misfits[0].name})")
    skips = skips + misfits

    uses_qdq = any(choice.format is Format.QDQ for _, choice in plan)
    if uses_qdq:
        _ensure_opset(model, QDQ_MIN_OPSET)
    if any(choice.format is Format.MATMULNBITS for _, choice in plan):
        model.opset_imports[MS_DOMAIN] = 1

    used_names = {v.name for v in model.graph.initializers.values() if v.name}
    used_names |= {n.name for n in model.graph if n.name}
    for node in model.graph:
        used_names |= {o.name for o in node.outputs if o.name}
    used_names |= {v.name for v in model.graph.inputs if v.name}

    total = len(plan)
    done = [0]

    def on_done(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(name, done[0], total)

    entries = []
    for site, choice in plan:
        writer = write_matmulnbits if choice.format is Format.MATMULNBITS else write_qdq
        writer(model.graph, site, config, used_names, on_done)
        entries.append(
            QuantizedEntry(
                name=site.name,
                op=site.op,
                shape=(site.k, site.n),
                bits=config.bits,
                granularity=config.granularity.name,
                block_size=granularity_block_size(config),
                symmetric=config.symmetric,
                format=choice.format.value,
                format_reason=choice.reason,
                stored_bytes=stored_bytes(site, config, choice),
            )
        )

    needed_ir = 10 if uses_qdq else model.ir_version
    model.ir_version = min(max(model.ir_version, needed_ir), MAX_IR_VERSION)
    external = input_is_external or initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_path = save_model_atomically(model, out, external)
    return ConvertReport(
        input=src,
        output=out,
        external_data=data_path,
        quantized=tuple(entries),
        skipped=tuple(skips),
        input_bytes=model_bytes(src),
        output_bytes=model_bytes(out),
    )

