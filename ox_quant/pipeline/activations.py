"""Activation quantization in ``convert``: which activations, SmoothQuant, calibration, the Q/DQ pairs.

For every planned weight written as QDQ and read by MatMul, Gemm (``transA=0``) or Conv, the
node's activation input ``x`` is quantized (``ox_quant.ir.activation_qdq``, which also says
what ONNX Runtime fuses):

* ``int8`` / ``uint8`` (static): ranges from calibration feeds (``--calibrate``:
  ``ox_quant.core.calibrate``), per tensor (one scale) or per channel (one scale per K along
  x's channel axis; min-max only); a Conv's output gets a pair too (QLinearConv needs it);
* ``dynamic``: ``DynamicQuantizeLinear`` at run time (uint8, per tensor), no calibration;
* granularity ``token`` (any mode): symmetric int8 per row of the last axis, at run time.

SmoothQuant (``smooth_alpha``): for each activation read by MatMul/Gemm weights,
``s_k = max|X_k|^a / max_n |W_kn|^(1-a)`` (over every weight reading x; ``s_k = 1`` where either
max is 0), weights scaled ``diag(s) W`` and ``1/s`` folded into the producer of x
(``ox_quant.ir.input_scales``) before the weights are quantized and the ranges calibrated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from ox_quant.calibration.observe import observe
from ox_quant.core.act_quant import act_qparams
from ox_quant.core.calibrate import DEFAULT_BINS, Calibrator, RangeStats, calibrated_range
from ox_quant.errors import OxQuantError
from ox_quant.ir.activation_qdq import (
    ActivationSite,
    activation_sites,
    add_weight_zero_points,
    insert_dynamic,
    insert_fake_quant,
    insert_output_pair,
    insert_per_token,
    insert_static,
    split_gemm_bias,
)
from ox_quant.ir.input_scales import apply_input_scales, input_groups
from ox_quant.ir.sites import Skip, WeightSite

MODES = ("int8", "uint8", "dynamic")
GRANULARITIES = ("tensor", "channel", "token")
Feeds = Iterable[Mapping[str, np.ndarray]]
"""Calibration feeds (input name -> array), iterated once per pass (a list, or a re-iterable
``ox_quant.calibration.feeds.FeedSource``)."""


@dataclass(frozen=True)
class ActivationOptions:
    """``mode``: int8, uint8 (static, calibrated) or dynamic; ``granularity``: tensor, channel or
    token; ``feeds``: calibration feeds (static modes and SmoothQuant need them)."""

    mode: str = "uint8"
    calibrator: Calibrator = field(default_factory=Calibrator)
    granularity: str = "tensor"
    feeds: Feeds | None = None
    smooth_alpha: float | None = None
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OxQuantError(f"--activations {self.mode!r}: use int8, uint8 or dynamic")
        if self.granularity not in GRANULARITIES:
            raise OxQuantError(f"--activation-granularity {self.granularity!r}: use tensor, channel or token")
        if self.granularity == "channel" and self.mode == "dynamic":
            raise OxQuantError("--activation-granularity channel needs calibrated ranges (--activations int8|uint8), "
                               "not dynamic")
        if self.granularity == "channel" and self.calibrator.method != "minmax":
            raise OxQuantError(f"--activation-granularity channel takes --calibrate minmax only, not {self.calibrator}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise OxQuantError(f"--smooth-alpha must be in [0, 1], got {self.smooth_alpha}")

    @property
    def needs_feeds(self) -> bool:
        return (self.mode != "dynamic" and self.granularity != "token") or self.smooth_alpha is not None

    def describe(self) -> str:
        if self.granularity == "token":
            how = "int8 per token (dynamic)"
        elif self.mode == "dynamic":
            how = "uint8 per tensor (dynamic)"
        else:
            how = f"{self.mode} per {self.granularity} ({self.calibrator})"
        return how + (f", SmoothQuant alpha {self.smooth_alpha:g}" if self.smooth_alpha is not None else "")


@dataclass(frozen=True)
class ActivationEntry:
    """One quantized activation in the report."""

    tensor: str
    ops: str
    how: str
    scale: float | None = None
    zero_point: int | None = None
    range: tuple[float, float] | None = None
    output_pairs: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"tensor": self.tensor, "ops": self.ops, "how": self.how, "scale": self.scale,
                "zero_point": self.zero_point, "range": list(self.range) if self.range else None,
                "output_pairs": self.output_pairs}


@dataclass(frozen=True)
class SmoothedInput:
    tensor: str
    weights: tuple[str, ...]
    how: str
    max_scale: float
    min_scale: float


@dataclass
class ActivationResult:
    entries: list[ActivationEntry] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    smoothed: list[SmoothedInput] = field(default_factory=list)
    feeds_seen: int = 0


@dataclass
class _Prepared:
    sites: list[ActivationSite]
    params: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float] | None]]
    result: ActivationResult


def _candidates(model: ir.Model, planned: Sequence[tuple[WeightSite, str, bool]]) -> tuple[
        list[tuple[ir.Node, ir.Graph, int]], list[Skip]]:
    """``(node, graph, K)`` of every use whose activation can take a pair, and skips with reasons.
    ``planned``: (site, its format, activations wanted by the recipe)."""
    nodes: list[tuple[ir.Node, ir.Graph, int]] = []
    skips: list[Skip] = []
    for site, fmt, wanted in planned:
        if not wanted:
            skips.append(Skip(site.name, "activation left float by the recipe (activations: false)"))
            continue
        if fmt != "qdq":
            skips.append(Skip(site.name, f"activation left float: its weight is {fmt} (only QDQ weights fuse "
                                         "with quantized activations; MatMulNBits' int8 path is --accuracy-level 4)"))
            continue
        if site.graph is not model.graph:
            skips.append(Skip(site.name, "activation left float: the weight is read inside a subgraph"))
            continue
        for use in site.uses:
            node = use.node
            if use.kind not in ("matmul", "gemm", "conv") or use.index != 1:
                skips.append(Skip(site.name, f"activation left float: read by {use.op} input {use.index}"))
                continue
            trans_a = node.attributes.get("transA")
            if use.kind == "gemm" and trans_a is not None and trans_a.as_int():
                skips.append(Skip(site.name, "activation left float: Gemm with transA=1"))
                continue
            x = node.inputs[0]
            if x is None or x.const_value is not None:
                skips.append(Skip(site.name, "activation left float: its other input is a constant"))
                continue
            k = int(site.stored_shape[1]) if use.kind == "conv" else site.k
            nodes.append((node, site.graph, k))
    return nodes, skips


def _check_finite(name: str, index: int, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        raise OxQuantError(f"calibration feed {index}: tensor {name!r} is {array.dtype}, not float")
    if not np.isfinite(array).all():
        raise OxQuantError(f"calibration feed {index}: tensor {name!r} has NaN or Inf values "
                           "(check the calibration data)")


def _channel_absmax(model: ir.Model, tensors: list[str], feeds: Feeds) -> tuple[dict[str, np.ndarray], int]:
    """``max |x|`` per last-axis channel of each tensor over all feeds."""
    out: dict[str, np.ndarray] = {}

    def on_feed(index: int, values: Mapping[str, np.ndarray]) -> None:
        for name, a in values.items():
            _check_finite(name, index, a)
            m = np.abs(a.astype(np.float64)).reshape(-1, a.shape[-1]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)

    count = observe(model, tensors, iter(feeds), on_feed)
    return out, count


def smooth(model: ir.Model, planned: Sequence[WeightSite], alpha: float, feeds: Feeds,
           used_names: set[str]) -> tuple[list[SmoothedInput], int]:
    """SmoothQuant on the MatMul/Gemm weights of ``planned`` (module doc); returns what was folded
    and how many feeds ran. The model changes in place (its float function stays the same)."""
    groups, _ = input_groups([s for s in planned if s.kinds <= {"matmul", "gemm"} and s.graph is model.graph])
    groups = [g for g in groups if g.tensor.name and g.tensor.const_value is None]
    if not groups:
        return [], 0
    absmax, count = _channel_absmax(model, [g.tensor.name or "" for g in groups], feeds)
    done: list[SmoothedInput] = []
    for group in groups:
        x_max = absmax[group.tensor.name or ""]
        w_max = np.zeros(group.k)
        for site in group.sites:
            assert site.value.const_value is not None
            w = site.normalise(np.asarray(site.value.const_value.numpy())).astype(np.float64)
            w_max = np.maximum(w_max, np.abs(w).max(axis=1))
        s = smooth_scales(x_max, w_max, alpha)
        if np.all(s == 1.0):
            continue
        how = apply_input_scales(group, s, used_names)
        done.append(SmoothedInput(group.tensor.name or "", tuple(site.name for site in group.sites), how,
                                  float(s.max()), float(s.min())))
    return done, count


def smooth_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s = x_max^alpha / w_max^(1-alpha)``, 1 where either is 0 (float64[K])."""
    x64, w64 = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    ok = (x64 > 0) & (w64 > 0)
    s = np.ones_like(x64)
    s[ok] = x64[ok] ** alpha / w64[ok] ** (1.0 - alpha)
    return s


def _collect(model: ir.Model, sites: list[ActivationSite], options: ActivationOptions) -> tuple[
        dict[str, RangeStats], dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per-tensor histograms (tensor granularity, Conv outputs) and per-channel min/max (channel)."""
    assert options.feeds is not None
    per_tensor: dict[str, RangeStats] = {}
    per_channel: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    axes = {site.name: site.channel_axis for site in sites}
    names = [site.name for site in sites] + [y.name or "" for site in sites for y in site.conv_outputs()]

    def on_feed(index: int, values: Mapping[str, np.ndarray]) -> None:
        for name, a in values.items():
            _check_finite(name, index, a)
            if options.granularity == "channel" and name in axes:
                moved = np.moveaxis(a, axes[name], -1).reshape(-1, a.shape[axes[name]])
                lo, hi = moved.min(axis=0).astype(np.float64), moved.max(axis=0).astype(np.float64)
                if name in per_channel:
                    lo, hi = np.minimum(per_channel[name][0], lo), np.maximum(per_channel[name][1], hi)
                per_channel[name] = (lo, hi)
            else:
                per_tensor.setdefault(name, RangeStats(options.bins)).update(a)

    count = observe(model, list(dict.fromkeys(names)), iter(options.feeds), on_feed)
    if count == 0:
        raise OxQuantError("the calibration data holds no feeds")
    return per_tensor, per_channel, count


def prepare(model: ir.Model, planned: Sequence[tuple[WeightSite, str, bool]], options: ActivationOptions,
            used_names: set[str], feeds: Feeds | None = None) -> _Prepared:
    """SmoothQuant (if asked), then the activation sites and their calibrated parameters; run
    before the weights are written (the weights are still float). ``feeds``: used when
    ``options.feeds`` is None (``--calibration``)."""
    if options.feeds is None and feeds is not None:
        options = replace(options, feeds=feeds)
    result = ActivationResult()
    if options.needs_feeds and options.feeds is None:
        raise OxQuantError(f"--activations {options.mode} needs calibration data (--calibration)"
                           + ("" if options.mode != "dynamic" else " for --smooth-alpha"))
    if options.smooth_alpha is not None:
        assert options.feeds is not None
        wanted = [site for site, fmt, ok in planned if ok and fmt == "qdq"]
        result.smoothed, result.feeds_seen = smooth(model, wanted, options.smooth_alpha, options.feeds, used_names)
    nodes, skips = _candidates(model, planned)
    result.skipped = skips
    if options.granularity == "token":
        kept = [(n, g, k) for n, g, k in nodes if n.op_type != "Conv"]
        result.skipped += [Skip(n.name or n.op_type, "activation left float: per-token scales apply to MatMul/Gemm "
                                "rows, not Conv") for n, _, _ in nodes if n.op_type == "Conv"]
        nodes = kept
    sites = activation_sites(nodes)
    params: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float] | None]] = {}
    if options.mode == "dynamic" or options.granularity == "token" or not sites:
        return _Prepared(sites, params, result)
    per_tensor, per_channel, count = _collect(model, sites, options)
    result.feeds_seen = max(result.feeds_seen, count)
    for name, (lo, hi) in per_channel.items():
        scale, zp = act_qparams(lo, hi, options.mode)
        params[name] = (scale, zp, None)
    for name, stats in per_tensor.items():
        lo_t, hi_t = calibrated_range(stats, options.calibrator, options.mode)
        scale, zp = act_qparams(lo_t, hi_t, options.mode)
        params[name] = (scale, zp, (lo_t, hi_t))
    return _Prepared(sites, params, result)


def write(model: ir.Model, prepared: _Prepared, options: ActivationOptions, used_names: set[str]) -> ActivationResult:
    """Insert the pairs (after the weights are written as DequantizeLinear)."""
    result = prepared.result
    opset = model.opset_imports.get("", 1)
    for site in prepared.sites:
        split_gemm_bias(site, used_names)
        add_weight_zero_points(site.nodes, site.graph, used_names)
        if options.granularity == "token":
            insert_per_token(site, used_names, opset)
            result.entries.append(ActivationEntry(site.name, site.ops, "int8 per token (dynamic)"))
            continue
        if options.mode == "dynamic":
            insert_dynamic(site, used_names)
            result.entries.append(ActivationEntry(site.name, site.ops, "uint8 per tensor (dynamic)"))
            continue
        scale, zp, rng = prepared.params[site.name]
        per_channel = scale.ndim == 1
        if per_channel:
            insert_fake_quant(site, scale, zp, options.mode, used_names)
        else:
            insert_static(site, scale, zp, used_names)
        pairs = 0
        for node in site.nodes:
            if node.op_type != "Conv":
                continue
            y_scale, y_zp, _ = prepared.params[node.outputs[0].name or ""]
            if np.ndim(y_scale) == 0:
                pairs += insert_output_pair(site.graph, node, y_scale, y_zp, used_names)
        how = f"{options.mode} per {'channel' if per_channel else 'tensor'} ({options.calibrator})"
        result.entries.append(ActivationEntry(
            site.name, site.ops, how, None if per_channel else float(scale), None if per_channel else int(zp),
            rng, pairs))
    return result
