"""``convert``: load -> plan -> rewrite -> save, and a report of what was done.

The input model and its external data are never modified: the output is written under
a temporary name beside its destination and renamed into place.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from ox_quant.algorithms.base import InputScaler, Needs, SiteStats
from ox_quant.algorithms.registry import get_quantizer
from ox_quant.calibration.driver import Calibration, SiteReport, Target, calibrate
from ox_quant.calibration.feeds import FeedSource
from ox_quant.core.config import DEFAULT_ALGORITHM, Format, PerChannel, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats.base import QuantFormat
from ox_quant.formats.choice import (
    FormatChoice,
    check_granularity_fits,
    choose_format,
    choose_gather_format,
    choose_qdq_only,
    granularity_block_size,
)
from ox_quant.formats.qdq import qdq_rejects
from ox_quant.formats.registry import format_named
from ox_quant.formats.tied import TIED_FORMAT, TIED_FORMATS, plan_tied, write_tied
from ox_quant.formats.writers import matmulnbits_blocker
from ox_quant.ir.fold import fold_constant_weights
from ox_quant.ir.merge_siblings import MergedGroup, merge_siblings
from ox_quant.ir.modelio import (
    EXTERNAL_DATA_THRESHOLD,
    PROTOBUF_LIMIT,
    external_files,
    initializer_bytes,
    model_bytes,
    save_model_atomically,
)
from ox_quant.ir.sites import QUANTIZABLE_OPS, Skip, WeightSite, find_sites, name_matches
from ox_quant.ir.wire import load_attribute_tensors
from ox_quant.pipeline.activations import ActivationEntry, ActivationOptions, SmoothedInput
from ox_quant.pipeline.activations import prepare as prepare_activations
from ox_quant.pipeline.activations import write as write_activations
from ox_quant.pipeline.input_scaling import ScaledInput, float_input_stats, scale_inputs
from ox_quant.pipeline.load import load_model
from ox_quant.pipeline.policy import POLICY_SKIP, Policy, config_for_site, plan_with_fallback
from ox_quant.pipeline.selection import Selection, first_matching_rule, graph_order, resolve_positions
from ox_quant.runtime.loadable import check_runnable
from ox_quant.runtime.session import max_ir_version


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs besides the paths.

    ``calibration``: per-site statistics (``SiteStats``, keyed by the weight's initializer
    name) that a calibration stage gathered; each site's entry is handed to the quantizer of
    its config's ``algorithm`` (round-to-nearest ignores it). None: no calibration.
    ``calibration_data``: feeds (``ox_quant.calibration.feeds``), or a function making them
    from the loaded model (so they are checked against its inputs); when given, the calibration
    stage (``ox_quant.calibration.driver.calibrate``) runs on the planned weights after
    planning, quantizes them (sequentially, level by level, when an algorithm asks for it) and
    the writers store its results; its statistics replace ``calibration``.
    """

    config: QuantConfig = field(default_factory=QuantConfig)
    selection: Selection = field(default_factory=Selection)
    calibration: Mapping[str, SiteStats] | None = None
    calibration_data: FeedSource | Callable[[ir.Model], FeedSource] | None = None
    policy: Policy = field(default_factory=Policy)
    """Bits of Conv and embedding weights (``ox_quant.pipeline.policy``); ``UNIFORM``: all at ``config``."""
    activations: ActivationOptions | None = None
    """Quantize the activations of QDQ-weight MatMul/Gemm/Conv too (``ox_quant.pipeline.activations``); None: weights only."""
    external_data: bool | None = None
    """Weights in ``<output>.data`` (True) or inside the .onnx (False); None: external when the input's
    are or the weights reach ``EXTERNAL_DATA_THRESHOLD`` (ONNX Runtime maps such a file instead of
    holding a copy on its heap)."""
    merge_siblings: bool | None = None
    """Merge MatMulNBits nodes that read one input into one node (``ox_quant.ir.merge_siblings``:
    q/k/v, gate/up); None: off for a model file, on for an LLM folder (``convert_folder``)."""


@dataclass(frozen=True)
class QuantizedEntry:
    """One quantized weight in the report. ``shape`` is the normalised ``W[K, N]``;
    ``stored_shape`` the tensor's shape in the model (e.g. ``[Cout, Cin, kh, kw]`` for Conv,
    ``[N, K]`` for a ``transB=1`` Gemm), as ``inspect`` shows it."""

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
    stored_shape: tuple[int, ...] = ()
    config_reason: str = "--bits"
    """Why this config: ``--bits``, the default policy, a flag, a recipe rule, raised bits."""
    algorithm: str = DEFAULT_ALGORITHM
    calibration: SiteReport | None = None
    """What the calibration stage did for this weight (samples, calibration error RTN vs algorithm)."""

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.shape[0] * self.shape[1])

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "stored_shape": list(self.stored_shape or self.shape),
            "bits": self.bits,
            "granularity": self.granularity,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "format": self.format,
            "format_reason": self.format_reason,
            "config_reason": self.config_reason,
            "stored_bytes": self.stored_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "algorithm": self.algorithm,
            "calibration": self.calibration.as_dict() if self.calibration is not None else None,
        }


@dataclass(frozen=True)
class VersionChange:
    """A version of the model that ``convert`` changed: ``what`` went ``old -> new`` because ``reason``."""

    what: str
    """``"ai.onnx opset"`` or ``"IR version"``."""
    old: int
    new: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"what": self.what, "from": self.old, "to": self.new, "reason": self.reason}

    def describe(self) -> str:
        return f"{self.what} {'raised' if self.new > self.old else 'lowered'} {self.old} -> {self.new}: {self.reason}"


SKIP_NAMES_SHOWN = 3


@dataclass(frozen=True)
class SkipGroup:
    """Skips that share one reason: how many, and the first few names."""

    reason: str
    count: int
    names: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"reason": self.reason, "count": self.count, "names": list(self.names)}


def group_skips(skips: tuple[Skip, ...] | list[Skip]) -> list[SkipGroup]:
    """Skips grouped by reason (a leading element count is left out of the reason), largest
    group first, each with its first :data:`SKIP_NAMES_SHOWN` names."""
    groups: dict[str, list[str]] = {}
    for skip in skips:
        groups.setdefault(re.sub(r"^\d+ elements, ", "", skip.reason), []).append(skip.name)
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    return [SkipGroup(reason, len(names), tuple(names[:SKIP_NAMES_SHOWN])) for reason, names in ordered]


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
    version_changes: tuple[VersionChange, ...] = ()
    policy: str = ""
    """One line: the config each kind of weight got by default (``Policy.describe``)."""
    scaled_inputs: tuple[ScaledInput, ...] = ()
    """Activations whose readers took input scales before quantizing (AWQ), and how."""
    unscaled: tuple[tuple[str, str], ...] = ()
    """(weight, why) for weights whose algorithm asked for input scales that could not be applied."""
    calibration: dict[str, object] | None = None
    """The calibration stage's summary (``Calibration.as_dict``), None without one."""
    activations: tuple[ActivationEntry, ...] = ()
    """Activations quantized (``--activations``)."""
    activation_skips: tuple[Skip, ...] = ()
    smoothed: tuple[SmoothedInput, ...] = ()
    """Activations SmoothQuant rescaled, and where ``1/s`` went."""
    activation_mode: str = ""
    calibration_feeds: int = 0
    kernels: tuple[tuple[str, int], ...] = ()
    """Integer kernels ONNX Runtime's CPU optimizer made of the written model (activation mode only)."""
    merged: tuple[MergedGroup, ...] = ()
    """Sibling MatMulNBits nodes written as one (``ConvertOptions.merge_siblings``)."""

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
            "skipped_summary": [g.as_dict() for g in group_skips(self.skipped)],
            "version_changes": [c.as_dict() for c in self.version_changes],
            "bits_per_weight": round(bpw, 4) if bpw is not None else None,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "policy": self.policy,
            "input_scales": [{"tensor": i.tensor, "weights": list(i.weights), "fold": i.how} for i in self.scaled_inputs],
            "input_scales_not_applied": [{"name": n, "reason": r} for n, r in self.unscaled],
            "calibration": self.calibration,
            "activations": {
                "mode": self.activation_mode,
                "quantized": [a.as_dict() for a in self.activations],
                "skipped": [{"name": s.name, "reason": s.reason} for s in self.activation_skips],
                "smoothed": [{"tensor": m.tensor, "weights": list(m.weights), "fold": m.how,
                              "scale_range": [m.min_scale, m.max_scale]} for m in self.smoothed],
                "calibration_feeds": self.calibration_feeds,
                "ort_kernels": dict(self.kernels),
            } if self.activation_mode else None,
            "merged_siblings": [g.as_dict() for g in self.merged],
        }


def default_output_path(input_path: Path, config: QuantConfig) -> Path:
    """``model.onnx`` -> ``model.int4-block128.onnx`` (beside the input; ``-sym`` added when symmetric)."""
    tag = f"int{config.bits}-{str(config.granularity).replace(':', '')}"
    if config.symmetric:
        tag += "-sym"
    if config.format is not Format.AUTO:
        tag += f"-{config.format.value}"
    if config.algorithm != DEFAULT_ALGORITHM:
        tag += f"-{config.algorithm}"
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
        if config.granularity.k_block is not None or config.granularity.n_group is not None:
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
    if "gather" in kinds:
        return plan_tied(site, config)
    blocker = matmulnbits_blocker(site)  # MatMul, Gemm, MatMul behind a Transpose
    if blocker is None:
        return config, choose_format(config, site.k, site.n, site.dtype)
    if config.format in (Format.MATMULNBITS, Format.CUSTOM):
        return Skip(site.name, f"--format {config.format.value}: {blocker}")
    return config, choose_qdq_only(config, blocker)




ACTIVATION_MIN_OPSET = 13  # per-axis QuantizeLinear


def _activations_wanted(site: WeightSite, selection: Selection) -> bool:
    """False when the first recipe rule matching ``site`` says ``activations: false``."""
    matched = first_matching_rule(site, selection.rules)
    return matched is None or bool(matched[1].overrides.get("activations", True))


def formats_written(choice_format: str) -> tuple[QuantFormat, ...]:
    """The registered formats a planned choice writes (a tied table writes two over one tensor)."""
    if choice_format == TIED_FORMAT:
        return tuple(format_named(name) for name in TIED_FORMATS)
    return (format_named(choice_format),)


def writer_for(choice_format: str) -> Callable[..., int]:
    """The writer of a planned choice: its format's ``write``, or the tied-table writer."""
    return write_tied if choice_format == TIED_FORMAT else format_named(choice_format).write


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

# What each explicitly requested --format may write (MatMulNBits' sibling for embeddings too).
REQUESTED_WRITES = {
    Format.MATMULNBITS: ("matmulnbits", "gather_block_quantized"),
    Format.QDQ: ("qdq",),
    Format.CUSTOM: ("custom",),
}


def _outside_requested_format(site: WeightSite, config: QuantConfig, choice: FormatChoice) -> Skip | None:
    """The rule for an explicit ``--format``: a weight it cannot hold stays float (a skip
    with the reason), it is never written in another format."""
    allowed = REQUESTED_WRITES.get(config.format)
    if allowed is None or choice.format in allowed:
        return None
    return Skip(site.name, f"--format {config.format.value} cannot hold {site.op} weights like this one "
                           f"(ox-quant writes them as {choice.format}: {choice.reason})")


def describe_selection(selection: Selection) -> str:
    """The selection flags in force, as the command line spells them."""
    parts = []
    if tuple(selection.include_ops) != QUANTIZABLE_OPS:
        parts.append("ops " + ", ".join(selection.include_ops) if selection.include_ops else "no op types")
    parts += [f"--include {p!r}" for p in selection.include]
    parts += [f"--exclude {p!r}" for p in selection.exclude]
    if selection.min_elements:
        parts.append(f"--min-elements {selection.min_elements}")
    return "; ".join(parts)


def _nothing_selected(model: ir.Model, selection: Selection) -> OxQuantError | None:
    """The error when the selection filtered out every weight the model offers (None when
    the model offers none: then there is nothing to select from)."""
    every, _ = find_sites(model)
    if not every:
        return None
    ops = Counter(site.op for site in every)
    offered = ", ".join(f"{op} ({n})" for op, n in sorted(ops.items()))
    return OxQuantError(
        f"no weight matched the selection ({describe_selection(selection) or 'default'}): the model's "
        f"quantizable weights are read by {offered}; nothing written"
    )


def _with_positions_resolved(model: ir.Model, options: ConvertOptions) -> ConvertOptions:
    """``options`` with the recipe's ``position`` rules bound to the weights they name."""
    selection = options.selection
    if not any(rule.position for rule in selection.rules):
        return options
    found, _ = find_sites(model, selection.include_ops)
    sites, _ = _select(found, selection)
    rules = resolve_positions(selection.rules, sites, graph_order(sites))
    return replace(options, selection=replace(selection, rules=rules))


def _plan(model: ir.Model, options: ConvertOptions) -> tuple[Plan, list[Skip]]:
    """Every weight site with its config, format and why that config, and the skips (with reasons).

    Raises ``OxQuantError`` when no weight can be written (each failed for the same reason).
    """
    selection = options.selection
    found, skips = find_sites(model, selection.include_ops)
    sites, filtered = _select(found, selection)
    skips = skips + filtered
    if not sites:
        nothing = _nothing_selected(model, selection)
        if nothing is not None:
            raise nothing
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
        get_quantizer(config.algorithm)  # an unknown algorithm is an error, not a skip
        try:
            planned = plan_with_fallback(site, config, plan_site)
        except OxQuantError as exc:
            errors.append((site, exc))
            continue
        if isinstance(planned, Skip):
            site_skips.append(planned)
        elif (outside := _outside_requested_format(site, planned[0], planned[1])) is not None:
            site_skips.append(outside)
        else:
            config, choice, raised = planned
            plan.append((site, config, choice, f"{why}; {raised}" if raised else why))
    if errors and not plan:
        raise OxQuantError(f"{errors[0][1]}; nothing written") from errors[0][1]
    if site_skips and not plan and not errors and not any(s.reason == "skipped by the recipe" or POLICY_SKIP in s.reason for s in site_skips):
        misfit = site_skips[0]
        raise OxQuantError(f"{misfit.reason} for every weight (e.g. {misfit.name}); nothing written")
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


def _check_calibration_given(plan: Plan, options: ConvertOptions) -> None:
    """An algorithm that needs calibration statistics, with no calibration at all, is an error
    (a weight whose activation cannot be observed, under a calibration, is rounded to nearest)."""
    if options.calibration is not None or options.calibration_data is not None:
        return
    needing = sorted({c.algorithm for _, c, _, _ in plan if get_quantizer(c.algorithm).needs is not Needs.NONE})
    if needing:
        raise OxQuantError(f"--algorithm {needing[0]} needs calibration data (--calibration): it uses statistics "
                           "of each weight's inputs; nothing written")


def convert(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    options: ConvertOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calibration_progress: Callable[[str], None] | None = None,
) -> ConvertReport:
    """Quantize the eligible weights of ``input_path`` and write the result.

    ``progress(weight_name, done, total)`` is called as each weight is quantized;
    ``calibration_progress(line)`` as calibration passes start and end.
    Raises ``OxQuantError`` for bad input, impossible configurations or unwritable output.
    """
    options = options or ConvertOptions()
    selection = options.selection
    selection.compiled()  # validate regexes before touching any file
    get_quantizer(options.config.algorithm)
    src = Path(input_path)
    model = load_model(src, runnable=True, runtime_check=check_runnable)
    out = Path(output_path) if output_path is not None else default_output_path(src, options.config)
    if output_path is None and options.activations is not None:
        out = out.with_name(out.name.replace(".onnx", f".a{options.activations.mode}.onnx"))
    _check_paths(src, out, model)
    input_is_external = bool(external_files(model) - {src.resolve()})  # not its own embedded weights

    fold_constant_weights(model)
    options = _with_positions_resolved(model, options)
    plan, skips = _plan(model, options)
    formats = {f for _, _, choice, _ in plan for f in formats_written(choice.format)}
    changes: list[VersionChange] = []
    needed_opset = max([f.opset for f in formats if f.domain == ""], default=0)
    if (old_opset := _default_opset(model)) < needed_opset:
        # The upgrade may rebuild the graph: plan again on the upgraded one.
        _ensure_opset(model, needed_opset)
        raised = [f.op_type for f in formats if f.domain == "" and f.opset > old_opset]
        count = sum(any(f.op_type in raised for f in formats_written(choice.format)) for _, _, choice, _ in plan)
        changes.append(VersionChange(
            "ai.onnx opset", old_opset, _default_opset(model),
            f"{count} weight(s) are written as {', '.join(sorted(raised))}, which ox-quant writes at opset "
            f"{needed_opset} (INT4/UINT4 codes and block scales need it); the whole graph was converted",
        ))
        plan, skips = _plan(model, options)
        formats = {f for _, _, choice, _ in plan for f in formats_written(choice.format)}
    for fmt in formats:
        if fmt.domain:
            model.opset_imports[fmt.domain] = fmt.opset
    _check_calibration_given(plan, options)

    stage: Calibration | None = None
    feeds: FeedSource | None = None
    targets: list[Target] = []
    if options.calibration_data is not None:
        targets = [Target(site, config, get_quantizer(config.algorithm)) for site, config, _, _ in plan]
        data = options.calibration_data
        feeds = data if isinstance(data, FeedSource) else data(model)
    calibration = options.calibration
    scaled: list[ScaledInput] = []
    unscaled: dict[str, str] = {}
    if any(isinstance(get_quantizer(config.algorithm), InputScaler) for _, config, _, _ in plan):
        # before the calibration stage: it then gathers the statistics of the scaled inputs
        planned = [(site, config) for site, config, _, _ in plan]
        if feeds is not None:
            before = float_input_stats(model, planned, feeds, calibration_progress)
            _, scaled, unscaled = scale_inputs(planned, before, _all_names(model))
        else:
            calibration, scaled, unscaled = scale_inputs(planned, calibration or {}, _all_names(model))
    # with --activations, data-free weight algorithms need no per-weight stage (the feeds calibrate activations)
    if feeds is not None and (options.activations is None or any(t.quantizer.needs is not Needs.NONE for t in targets)):
        stage = calibrate(model, targets, feeds, progress=calibration_progress, workdir=out.resolve().parent)
    try:
        return _write(model, src, out, plan, skips, changes, formats, options, progress, input_is_external, stage,
                      calibration, (tuple(scaled), tuple(unscaled.items())), feeds)
    finally:
        if stage is not None:
            stage.close()  # its scratch folder, once the writers have read it


def _write(model: ir.Model, src: Path, out: Path, plan: Plan, skips: list[Skip], changes: list[VersionChange],
           formats: set[QuantFormat], options: ConvertOptions, progress: Callable[[str, int, int], None] | None,
           input_is_external: bool, stage: Calibration | None, given: Mapping[str, SiteStats] | None,
           scaling: tuple[tuple[ScaledInput, ...], tuple[tuple[str, str], ...]],
           feeds: FeedSource | None = None) -> ConvertReport:
    """Rewrite every planned site (with the calibration stage's results, if any) and save."""
    used_names = _all_names(model)
    calibration: Mapping[str, SiteStats] = stage.stats if stage is not None else (given or {})
    scaled, unscaled = scaling
    prepared = None
    if options.activations is not None:
        wanted = [(site, choice.format, _activations_wanted(site, options.selection)) for site, _, choice, _ in plan]
        prepared = prepare_activations(model, wanted, options.activations, used_names, feeds)
    total = len(plan)
    done = [0]

    def on_done(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(name, done[0], total)

    entries = []
    for site, config, choice, why in plan:
        stats = calibration.get(site.name)
        quantizer = get_quantizer(config.algorithm)
        if stage is not None:
            quantizer = stage.quantizer_for(site.name, quantizer)
        nbytes = writer_for(choice.format)(
            site, config, used_names, on_done, quantizer=quantizer, stats=stats
        )
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
                stored_shape=tuple(site.stored_shape),
                config_reason=why,
                algorithm=config.algorithm,
                calibration=stage.reports.get(site.name) if stage is not None else None,
            )
        )

    activations = None
    if prepared is not None and options.activations is not None:
        activations = write_activations(model, prepared, options.activations, used_names)
        if _default_opset(model) < ACTIVATION_MIN_OPSET:
            _ensure_opset(model, ACTIVATION_MIN_OPSET)
    merged = tuple(merge_siblings(model, used_names)) if options.merge_siblings else ()
    needed_ir = max([model.ir_version] + [f.min_ir_version for f in formats])
    old_ir = model.ir_version
    model.ir_version = min(max(model.ir_version, needed_ir), max_ir_version())  # what the installed ORT loads
    if model.ir_version != old_ir:
        why = ("the installed onnxruntime loads IR up to " f"{max_ir_version()}" if model.ir_version < old_ir
               else "INT4/UINT4 initializers need IR 10")
        changes.append(VersionChange("IR version", old_ir, model.ir_version, why))
    weight_bytes = initializer_bytes(model)
    if options.external_data is False and weight_bytes >= PROTOBUF_LIMIT:
        raise OxQuantError(f"--single-file: the weights ({weight_bytes / 2**30:.2f} GiB) exceed protobuf's 2 GiB "
                           "limit for one .onnx file; drop --single-file to write them as external data")
    external = (input_is_external or weight_bytes >= EXTERNAL_DATA_THRESHOLD) if options.external_data is None \
        else options.external_data
    if external:  # the saver re-writes initializers, not attribute tensors read in place
        load_attribute_tensors(model, src.resolve())
    data_path = save_model_atomically(model, out, external)
    kernels: tuple[tuple[str, int], ...] = ()
    if activations is not None:
        from ox_quant.runtime.fusion import integer_kernels, optimized_op_types

        kernels = tuple(integer_kernels(optimized_op_types(out)).items())
    return ConvertReport(
        input=src,
        output=out,
        external_data=data_path,
        quantized=tuple(entries),
        skipped=tuple(skips),
        input_bytes=model_bytes(src),
        output_bytes=model_bytes(out),
        version_changes=tuple(changes),
        policy=options.policy.describe(options.config),
        scaled_inputs=scaled,
        unscaled=unscaled,
        calibration=stage.as_dict() if stage is not None else None,
        activations=tuple(activations.entries) if activations else (),
        activation_skips=tuple(activations.skipped) if activations else (),
        smoothed=tuple(activations.smoothed) if activations else (),
        activation_mode=options.activations.describe() if options.activations else "",
        calibration_feeds=activations.feeds_seen if activations else 0,
        kernels=kernels,
        merged=merged,
    )
