"""``convert``: load -> plan -> rewrite -> save, and a report of what was done.

The input model and its external data are never modified: the output is written under
a temporary name beside its destination and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from ox_quant.config import Format, PerChannel, PerTensor, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.fold import fold_constant_weights
from ox_quant.formats import (
    FormatChoice,
    check_granularity_fits,
    choose_format,
    choose_gather_format,
    choose_qdq_only,
    granularity_block_size,
    qdq_rejects,
)
from ox_quant.modelio import (
    EXTERNAL_DATA_THRESHOLD,
    external_files,
    initializer_bytes,
    load_model,
    model_bytes,
    save_model_atomically,
)
from ox_quant.runtime import CUSTOM_DOMAIN, max_ir_version
from ox_quant.policy import POLICY_SKIP, Policy, config_for_site, plan_with_fallback
from ox_quant.selection import Selection
from ox_quant.sites import Skip, WeightSite, find_sites, name_matches
from ox_quant.writers import (
    MS_DOMAIN,
    matmulnbits_blocker,
    write_custom,
    write_gather_block_quantized,
    write_matmulnbits,
    write_qdq,
)

QDQ_MIN_OPSET = 21  # INT4/UINT4 and block_size on DequantizeLinear


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the paths."""

    config: QuantConfig = field(default_factory=QuantConfig)
    selection: Selection = field(default_factory=Selection)
    policy: Policy = field(default_factory=Policy)
    """Bits of Conv and embedding weights (``ox_quant.policy``); ``UNIFORM``: all at ``config``."""


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
    config_reason: str = "--bits"
    """Why this config: ``--bits``, the default policy, a flag, a recipe rule, raised bits."""

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
            "config_reason": self.config_reason,
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
    policy: str = ""
    """One line: the config each kind of weight got by default (``Policy.describe``)."""

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
            "policy": self.policy,
        }


def default_output_path(input_path: Path, config: QuantConfig) -> Path:
    """``model.onnx`` -> ``model.int4-block128.onnx`` (beside the input; ``-sym`` added when symmetric)."""
    tag = f"int{config.bits}-{str(config.granularity).replace(':', '')}"
    if config.symmetric:
        tag += "-sym"
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
    try:
        _check_output_path(input_path, output, model)
    except OSError as exc:  # e.g. a name too long, a loop of symbolic links
        raise OxQuantError(f"cannot use output path {output}: {exc.strerror or exc}") from exc


def _check_output_path(input_path: Path, output: Path, model: ir.Model) -> None:
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


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _ensure_opset(model: ir.Model, needed: int) -> None:
    """Upgrade the model's ai.onnx opset to ``needed`` (QDQ with INT4 or blocks needs 21).

    Uses onnxscript's converter where it has adapters and ONNX's C++ converter otherwise
    (on the graph without its weights); a model it cannot upgrade is refused.
    """
    current = _default_opset(model)
    if current >= needed:
        return
    import logging

    from onnxscript import version_converter

    quiet = logging.getLogger("onnxscript.version_converter")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        version_converter.convert_version(model, target_version=needed, fallback=True)
    except Exception as exc:
        raise OxQuantError(
            f"QDQ output needs opset {needed} but the model is opset {current} and could not be upgraded "
            f"({type(exc).__name__}); try --format matmulnbits"
        ) from exc
    finally:
        quiet.setLevel(level)
    if _default_opset(model) < needed:
        raise OxQuantError(
            f"QDQ output needs opset {needed} but the model is opset {current} and ONNX's version converter "
            "could not upgrade it; try --format matmulnbits, or upgrade the model first"
        )


def plan_site(site: WeightSite, config: QuantConfig) -> tuple[QuantConfig, FormatChoice] | Skip:
    """The effective config and format for one site, or a skip with the reason.

    Raises ``OxQuantError`` when the config itself is impossible (no format expresses it).
    """
    kinds = site.kinds
    if kinds == {"conv"}:
        if not isinstance(config.granularity, (PerTensor, PerChannel)):
            config = replace(config, granularity=PerChannel())
        if qdq_rejects(config, site.k, site.n):
            return Skip(site.name, f"Conv weights are written as QDQ, which takes 4 or 8 bits, not {config.bits}")
        return config, FormatChoice("qdq", "Conv weights are quantized per output channel (QDQ)")
    misfit = check_granularity_fits(config, site.k, site.n, partial_block=kinds <= {"matmul", "gemm"})
    if misfit:
        return Skip(site.name, misfit)
    if site.dtype == "BFLOAT16":
        return config, choose_qdq_only(config, "bfloat16 weights: only DequantizeLinear takes bfloat16 scales")
    if kinds == {"gather"}:
        return config, choose_gather_format(config, site.k, site.n, site.dtype)
    if kinds <= {"matmul", "gemm"}:
        blocker = matmulnbits_blocker(site)
        if blocker is None:
            return config, choose_format(config, site.k, site.n, site.dtype)
        if config.format in (Format.MATMULNBITS, Format.CUSTOM):
            return Skip(site.name, f"--format {config.format.value}: {blocker}")
        return config, choose_qdq_only(config, blocker)
    if "gather" in kinds:
        return config, choose_qdq_only(config, "tied weight: one DequantizeLinear serves the Gather and the MatMul")
    return config, choose_qdq_only(config, "the MatMul reads the weight through a Transpose")


WRITERS = {
    "matmulnbits": write_matmulnbits,
    "qdq": write_qdq,
    "gather_block_quantized": write_gather_block_quantized,
    "custom": write_custom,
}


def _select(sites: list[WeightSite], selection: Selection) -> tuple[list[WeightSite], list[Skip]]:
    include, exclude = selection.compiled()
    chosen, skips = [], []
    for site in sites:
        hit = name_matches(exclude, site)
        if hit is not None:
            skips.append(Skip(site.name, f"excluded by --exclude {hit!r}"))
        elif include and name_matches(include, site) is None:
            skips.append(Skip(site.name, "not matched by --include"))
        elif site.numel < selection.min_elements:
            skips.append(Skip(site.name, f"{site.numel} elements, fewer than --min-elements {selection.min_elements}"))
        else:
            chosen.append(site)
    return chosen, skips


Plan = list[tuple[WeightSite, QuantConfig, FormatChoice, str]]


def _plan(model: ir.Model, options: ConvertOptions) -> tuple[Plan, list[Skip]]:
    """Every weight site with its config, format and why that config, and the skips (with reasons).

    Raises ``OxQuantError`` when no weight can be written (each failed for the same reason).
    """
    selection = options.selection
    found, skips = find_sites(model, selection.include_ops)
    sites, filtered = _select(found, selection)
    skips = skips + filtered
    plan: Plan = []
    site_skips: list[Skip] = []
    errors: list[tuple[WeightSite, OxQuantError]] = []
    for site in sites:
        try:
            chosen = config_for_site(site, options.config, selection.rules, options.policy)
        except OxQuantError as exc:
            errors.append((site, exc))
            continue
        if chosen is None or isinstance(chosen, Skip):
            site_skips.append(chosen or Skip(site.name, "skipped by the recipe"))
            continue
        config, why = chosen
        try:
            planned = plan_with_fallback(site, config, plan_site)
        except OxQuantError as exc:
            errors.append((site, exc))
            continue
        if isinstance(planned, Skip):
            site_skips.append(planned)
        else:
            config, choice, raised = planned
            plan.append((site, config, choice, f"{why}; {raised}" if raised else why))
    if errors and not plan:
        raise errors[0][1]
    if site_skips and not plan and not errors and not any(s.reason == "skipped by the recipe" or POLICY_SKIP in s.reason for s in site_skips):
        misfit = site_skips[0]
        raise OxQuantError(f"{misfit.reason} for every weight (e.g. {misfit.name})")
    return plan, skips + site_skips + [Skip(site.name, str(exc)) for site, exc in errors]


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in model.graphs():
        names |= {n for n in graph.initializers if n}
        names |= {v.name for v in graph.inputs if v.name}
        for node in graph:
            if node.name:
                names.add(node.name)
            names |= {o.name for o in node.outputs if o.name}
    return names


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
    selection = options.selection
    selection.compiled()  # validate regexes before touching any file
    src = Path(input_path)
    model = load_model(src, runnable=True)
    out = Path(output_path) if output_path is not None else default_output_path(src, options.config)
    _check_paths(src, out, model)
    input_is_external = bool(external_files(model))

    fold_constant_weights(model)
    plan, skips = _plan(model, options)
    formats = {choice.format for _, _, choice, _ in plan}
    if "qdq" in formats and _default_opset(model) < QDQ_MIN_OPSET:
        # The upgrade may rebuild the graph: plan again on the upgraded one.
        _ensure_opset(model, QDQ_MIN_OPSET)
        plan, skips = _plan(model, options)
        formats = {choice.format for _, _, choice, _ in plan}
    if formats & {"matmulnbits", "gather_block_quantized"}:
        model.opset_imports[MS_DOMAIN] = 1
    if "custom" in formats:
        model.opset_imports[CUSTOM_DOMAIN] = 1

    used_names = _all_names(model)
    total = len(plan)
    done = [0]

    def on_done(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(name, done[0], total)

    entries = []
    for site, config, choice, why in plan:
        nbytes = WRITERS[choice.format](site, config, used_names, on_done)
        entries.append(
            QuantizedEntry(
                name=site.name,
                op=site.op,
                shape=(site.k, site.n),
                bits=config.bits,
                granularity=config.granularity.name,
                block_size=granularity_block_size(config),
                symmetric=config.symmetric,
                format=choice.format,
                format_reason=choice.reason,
                stored_bytes=nbytes,
                config_reason=why,
            )
        )

    needed_ir = 10 if "qdq" in formats else model.ir_version
    model.ir_version = min(max(model.ir_version, needed_ir), max_ir_version())  # what the installed ORT loads
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
        policy=options.policy.describe(options.config),
    )
