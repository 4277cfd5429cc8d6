"""The pre-quantization pass of algorithms with input scales (``InputScaler``, e.g. AWQ).

For every activation tensor read by planned weights whose algorithm scales inputs, in graph
order: the algorithm picks ``s[K]`` from the weights as they are now and the statistics of
that input, ``ox_quant.ir.input_scales`` applies it exactly in float, and the weights'
statistics become those of ``x / s`` (what their ``quantize`` then sees).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ox_quant.algorithms.base import InputScaler, SiteStats, scaled_stats
from ox_quant.algorithms.registry import get_quantizer
from ox_quant.calibration.observe import Observer
from ox_quant.calibration.sites import activations
from ox_quant.calibration.stats import Accumulator, merge
from ox_quant.core.config import QuantConfig
from ox_quant.formats.writers import SCALE_DTYPES
from ox_quant.ir.input_scales import apply_input_scales, input_groups
from ox_quant.ir.sites import WeightSite


@dataclass(frozen=True)
class ScaledInput:
    """One activation whose readers were rescaled: their names and what was done to the producer."""

    tensor: str
    weights: tuple[str, ...]
    how: str


def float_input_stats(
    model: ir.Model,
    planned: Sequence[tuple[WeightSite, QuantConfig]],
    feeds: Iterable[Mapping[str, np.ndarray]] | None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, SiteStats]:
    """One pass over ``feeds`` on the float model: the statistics (Hessian included) of the
    inputs of the planned weights whose algorithm scales inputs, keyed by weight name."""
    wanting = [site for site, config in planned if isinstance(get_quantizer(config.algorithm), InputScaler)]
    acts = {site.name: activations(site, model) for site in wanting}
    width = {a: site.k for site in wanting for a in acts[site.name] if not a.transposed}
    if not width or feeds is None:
        return {}
    if progress is not None:
        progress(f"input scales: one pass over the float model for {len(width)} input(s) of {len(wanting)} weight(s)")
    accs = {a: Accumulator(k, hessian=True) for a, k in width.items()}
    observer = Observer(model, sorted({a.name for a in accs}))
    for feed in feeds:
        tensors = observer.run(feed)
        for a, acc in accs.items():
            acc.update(tensors[a.name])
    del observer
    return {site.name: merge([accs[a] for a in acts[site.name]]) for site in wanting
            if acts[site.name] and all(a in accs for a in acts[site.name])}


def scale_inputs(
    planned: Sequence[tuple[WeightSite, QuantConfig]],
    calibration: Mapping[str, SiteStats],
    used_names: set[str],
) -> tuple[dict[str, SiteStats], list[ScaledInput], dict[str, str]]:
    """Apply input scales for the planned weights whose algorithm is an ``InputScaler``.

    Returns the statistics to quantize with (scaled entries replaced), what was scaled, and
    the weights that asked for scales but could not take them (with the reason; e.g. no
    statistics of their input).
    """
    configs = {site.name: config for site, config in planned}
    wanting = [site for site, config in planned if isinstance(get_quantizer(config.algorithm), InputScaler)]
    stats = dict(calibration)
    groups, left_out = input_groups(wanting)
    done: list[ScaledInput] = []
    for group in groups:
        first = group.sites[0]
        scaler = get_quantizer(configs[first.name].algorithm)
        assert isinstance(scaler, InputScaler)
        group_stats = stats.get(first.name)
        if group_stats is None:
            for site in group.sites:
                left_out[site.name] = "no calibration statistics of its input"
            continue
        weights = []
        for site in group.sites:
            assert site.value.const_value is not None
            weights.append(site.normalise(np.asarray(site.value.const_value.numpy())))
        s = scaler.input_scales(
            weights, [configs[site.name] for site in group.sites],
            [np.dtype(SCALE_DTYPES[site.dtype][0]) for site in group.sites], group_stats,
        )
        if s is None:
            continue
        how = apply_input_scales(group, s, used_names)
        for site in group.sites:
            site_stats = stats.get(site.name, group_stats)
            stats[site.name] = scaled_stats(site_stats, s)
        done.append(ScaledInput(group.tensor.name or "", tuple(site.name for site in group.sites), how))
    return stats, done, left_out
