"""The calibration stage: statistics for every weight, quantization, and the calibration errors.

:func:`calibrate` takes the weights to quantize (:class:`Target`: site, effective config,
quantizer) and the feeds, and returns a :class:`Calibration`: each weight's statistics, its
quantized form (kept in a scratch folder, memory-mapped, so that the writers store exactly
what was chosen here) and a :class:`SiteReport` (samples, rows, state bytes, calibration
error of round-to-nearest and of the chosen algorithm, ``ox_quant.calibration.stats``).

Two schedules:

* **one pass** (no quantizer is ``sequential``): one run over the feeds gathers every site's
  statistics on the float model (a Hessian only for sites whose quantizer ``needs`` it);
  then each weight is quantized.
* **sequential** (some quantizer is ``sequential``, e.g. GPTQ): sites are grouped by level
  (:func:`ox_quant.calibration.sites.site_levels`); level 0 (no observable activation) is
  quantized first; for each level ``L >= 1`` in turn, the model runs over the feeds with
  every weight of levels ``< L`` replaced by its quantized-dequantized values (session
  initializer overrides, memory-mapped from the scratch folder), the statistics of level
  ``L``'s inputs are gathered, and level ``L`` is quantized. So each weight's inputs come
  from the partly quantized model. State held at once: one level's accumulators.

Sites with no observable activation get ``stats=None``. Quantizers are called as the writers
call them: ``quantize(W[K, N], config, scale_dtype, stats)``, ``scale_dtype`` the weight's
float type.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ox_quant.algorithms.base import Needs, Quantizer, SiteStats
from ox_quant.algorithms.rtn import RoundToNearest
from ox_quant.calibration.feeds import FeedSource
from ox_quant.calibration.observe import Observer
from ox_quant.calibration.sites import Activation, activations, site_levels
from ox_quant.calibration.stats import Accumulator, calibration_error, merge
from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight
from ox_quant.errors import OxQuantError
from ox_quant.formats.writers import SCALE_DTYPES
from ox_quant.ir.sites import WeightSite

Progress = Callable[[str], None]
"""Called with one line of progress (a pass started or ended)."""


@dataclass(frozen=True)
class Target:
    """One weight to calibrate and quantize: its site, effective config and quantizer."""

    site: WeightSite
    config: QuantConfig
    quantizer: Quantizer


@dataclass(frozen=True)
class SiteReport:
    """What calibration did for one weight. Errors: ``tr(dW^T H dW) / tr(W^T H W)`` (kind
    ``output``) or its diagonal version (kind ``diagonal``), RTN's and the chosen algorithm's;
    None without statistics."""

    name: str
    algorithm: str
    level: int
    samples: int
    rows: int
    state_bytes: int
    error_rtn: float | None
    error: float | None
    error_kind: str | None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "algorithm": self.algorithm, "level": self.level, "samples": self.samples, "rows": self.rows,
            "state_bytes": self.state_bytes, "error_kind": self.error_kind,
            "error_rtn": self.error_rtn, "error": self.error,
        }
        if self.note:
            out["note"] = self.note
        return out


class QuantizedStore:
    """Quantized weights (and, for the sequential schedule, their dequantized stored-layout
    values) as ``.npy`` files in a scratch folder, read back memory-mapped."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=".ox-quant-calibration-", dir=workdir))
        except OSError as exc:
            raise OxQuantError(f"cannot create a calibration scratch folder: {exc.strerror or exc}") from exc
        self._index: dict[str, int] = {}
        self._meta: dict[str, tuple[int, object, bool]] = {}

    def _path(self, name: str, part: str) -> Path:
        index = self._index.setdefault(name, len(self._index))
        return self.folder / f"{index}.{part}.npy"

    def put(self, name: str, q: QuantizedWeight) -> None:
        for part, array in (("codes", q.codes), ("scales", q.scales), ("zero_points", q.zero_points)):
            np.save(self._path(name, part), array, allow_pickle=False)
        self._meta[name] = (q.bits, q.granularity, q.symmetric)

    def get(self, name: str) -> QuantizedWeight:
        bits, granularity, symmetric = self._meta[name]
        codes = np.load(self._path(name, "codes"), mmap_mode="r")
        scales = np.load(self._path(name, "scales"))
        zps = np.load(self._path(name, "zero_points"))
        return QuantizedWeight(codes, scales, zps, bits, granularity, symmetric)  # type: ignore[arg-type]

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def put_dequantized(self, name: str, array: np.ndarray) -> np.ndarray:
        """Store ``array`` and return it memory-mapped (read-only)."""
        path = self._path(name, "dequantized")
        np.save(path, array, allow_pickle=False)
        return np.load(path, mmap_mode="r")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Precomputed:
    """A quantizer that returns the weight the calibration stage already quantized (so the
    writers store exactly that); ``name``, ``needs``, ``sequential`` are the original's."""

    def __init__(self, original: Quantizer, store: QuantizedStore, name: str) -> None:
        self.name = original.name
        self.needs = original.needs
        self.sequential = original.sequential
        self._store = store
        self._weight = name

    def quantize(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                 stats: SiteStats | None = None) -> QuantizedWeight:
        q = self._store.get(self._weight)
        if q.shape != weight.shape or q.bits != config.bits or q.scales.dtype != np.dtype(scale_dtype):
            raise OxQuantError(f"weight {self._weight!r} was calibrated for another shape or config")
        return QuantizedWeight(np.array(q.codes), q.scales, q.zero_points, q.bits, q.granularity, q.symmetric)

    def choose_qparams(self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype,
                       stats: SiteStats | None = None) -> QParams:
        q = self.quantize(weight, config, scale_dtype, stats)
        return QParams(q.scales, q.zero_points)


@dataclass
class Calibration:
    """The result of :func:`calibrate`; ``close()`` removes its scratch folder (after saving)."""

    source: str
    samples: int
    sequential: bool
    levels: int
    passes: int
    peak_state_bytes: int
    seconds: float
    stats: dict[str, SiteStats]
    """Each calibrated weight's statistics (Hessians dropped once used: memory stays bounded)."""
    reports: dict[str, SiteReport]
    store: QuantizedStore
    notes: list[str] = field(default_factory=list)

    def quantizer_for(self, name: str, original: Quantizer) -> Quantizer:
        """What the writer of weight ``name`` should call: its precomputed result, if any."""
        return Precomputed(original, self.store, name) if name in self.store else original

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source, "samples": self.samples, "schedule": "sequential" if self.sequential else "one pass",
            "levels": self.levels, "passes": self.passes, "peak_state_bytes": self.peak_state_bytes,
            "seconds": round(self.seconds, 3), "notes": self.notes,
        }

    def close(self) -> None:
        self.store.close()


def _weight(site: WeightSite) -> np.ndarray:
    tensor = site.value.const_value
    assert tensor is not None
    return site.normalise(np.asarray(tensor.numpy()))


def _release(site: WeightSite) -> None:
    tensor = site.value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def _stored_layout(site: WeightSite, kn: np.ndarray) -> np.ndarray:
    """A ``[K, N]`` array back in the weight's stored shape (inverse of ``WeightSite.normalise``)."""
    stored = kn if site.layout == "KN" else kn.T
    return np.ascontiguousarray(stored).reshape(site.stored_shape)


def _note(site: WeightSite, model: ir.Model) -> str:
    if site.graph is not model.graph:
        return "in a subgraph: no statistics"
    if "conv" in site.kinds:
        return "Conv: statistics of im2col patches are not gathered"
    if site.kinds == {"gather"}:
        return "embedding table: no activation multiplies it"
    return "its activation cannot be observed"


def calibrate(
    model: ir.Model,
    targets: Sequence[Target],
    feeds: FeedSource,
    *,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
    provider: str = "cpu",
    threads: int | None = None,
) -> Calibration:
    """Statistics, quantized weights and reports for ``targets`` (module docstring). ``model``
    is the loaded graph the targets' sites belong to (weights memory-mapped); it is not changed."""
    started = time.perf_counter()
    say = progress or (lambda line: None)
    sequential = any(t.quantizer.sequential for t in targets)
    acts = {t.site.name: activations(t.site, model) for t in targets}
    if sequential:
        levels = site_levels(model, [t.site for t in targets])
    else:
        levels = {t.site.name: (1 if acts[t.site.name] else 0) for t in targets}
    store = QuantizedStore(workdir)
    result = Calibration(feeds.description, len(feeds), sequential, max(levels.values(), default=0), 0, 0, 0.0,
                         {}, {}, store)
    rtn = RoundToNearest()
    overrides: dict[str, np.ndarray] = {}
    try:
        by_level: dict[int, list[Target]] = {}
        for t in targets:
            by_level.setdefault(levels[t.site.name], []).append(t)
        top = max(by_level, default=0)
        for level in sorted(by_level):
            group = by_level[level]
            gathered: dict[str, SiteStats] = {}
            if level > 0:
                gathered = _gather(model, group, acts, feeds, overrides if sequential else {}, result, level, top,
                                   say, provider, threads)
            for t in group:
                stats = gathered.get(t.site.name)
                _quantize(t, stats, level, rtn, result, model)
                if sequential:
                    if t.site.dtype == "BFLOAT16":
                        result.notes.append(f"{t.site.name}: bfloat16, read float by later levels")
                    else:
                        q = store.get(t.site.name)
                        kn = q.dequantize(np.float64).astype(SCALE_DTYPES[t.site.dtype][0])
                        overrides[t.site.name] = store.put_dequantized(t.site.name, _stored_layout(t.site, kn))
                _release(t.site)
    except BaseException:
        store.close()
        raise
    result.seconds = time.perf_counter() - started
    say(f"calibration done: {len(targets)} weights, {result.passes} pass(es) over {len(feeds)} feeds, "
        f"{result.seconds:.1f} s")
    return result


def _gather(model: ir.Model, group: list[Target], acts: dict[str, tuple[Activation, ...]], feeds: FeedSource,
            overrides: dict[str, np.ndarray], result: Calibration, level: int, top: int, say: Progress,
            provider: str, threads: int | None) -> dict[str, SiteStats]:
    """One pass over the feeds: the statistics of ``group``'s observable inputs."""
    needs_h: dict[Activation, bool] = {}
    width: dict[Activation, int] = {}
    for t in group:
        for act in acts[t.site.name]:
            needs_h[act] = needs_h.get(act, False) or t.quantizer.needs is Needs.HESSIAN
            width[act] = t.site.k
    if not needs_h:
        return {}
    accs = {act: Accumulator(width[act], needs_h[act]) for act in needs_h}
    state = sum(a.nbytes for a in accs.values())
    result.peak_state_bytes = max(result.peak_state_bytes, state)
    label = f"level {level}/{top}" if result.sequential else "one pass"
    say(f"calibrating {label}: {len(group)} weight(s), {len(accs)} input(s), state {state / 2**20:.1f} MiB, "
        f"{len(feeds)} feeds")
    names = sorted({a.name for a in accs})
    observer = Observer(model, names, initializers=overrides, prune=True, provider=provider, threads=threads)
    for feed in feeds:
        tensors = observer.run(feed)
        for act, acc in accs.items():
            x = tensors[act.name]
            if act.transposed:
                x = np.asarray(x).T
            acc.update(x)
    del observer
    result.passes += 1
    return {t.site.name: merge([accs[a] for a in acts[t.site.name]]) for t in group if acts[t.site.name]}


def _quantize(t: Target, stats: SiteStats | None, level: int, rtn: RoundToNearest, result: Calibration,
              model: ir.Model) -> None:
    site = t.site
    scale_dtype = np.dtype(SCALE_DTYPES[site.dtype][0])
    w = _weight(site)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite weights are reported by the writer
        q = t.quantizer.quantize(w, t.config, scale_dtype, stats)
    result.store.put(site.name, q)
    if stats is None:
        result.reports[site.name] = SiteReport(site.name, t.quantizer.name, level, 0, 0, 0, None, None, None,
                                               _note(site, model))
        return
    error, kind = calibration_error(w, q.dequantize(np.float64), stats)
    if t.quantizer.name == rtn.name:
        error_rtn = error
    else:
        error_rtn, _ = calibration_error(w, rtn.quantize(w, t.config, scale_dtype).dequantize(np.float64), stats)
    from ox_quant.algorithms.base import stats_bytes

    result.reports[site.name] = SiteReport(site.name, t.quantizer.name, level, stats.samples, stats.count,
                                           stats_bytes(stats.k, stats.hessian is not None), error_rtn, error, kind)
    result.stats[site.name] = replace(stats, hessian=None)
