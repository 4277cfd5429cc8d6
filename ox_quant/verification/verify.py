"""``verify``: how close a candidate ONNX model stays to a reference, in numbers.

The reference is an ONNX model or a PyTorch model SPEC (cross-framework check); the
candidate is an ONNX model (a float export or a quantized model). Both run on the same
inputs -- from an ``.npz`` file, or generated from the candidate's input specs with a
fixed seed (``ox_quant.verification.inputs``) -- and every candidate output is compared with the
reference output of the same name (or position, when the names differ) with
``ox_quant.core.metrics.compare``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.verification.inputs import generate_inputs, input_specs, load_graph, load_inputs
from ox_quant.core.metrics import OutputMetrics, compare
from ox_quant.verification.per_layer import LayerReport, attribute_errors
from ox_quant.export.spec import looks_like_onnx


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    """``"file"``, ``"given"`` (arrays passed to ``verify``) or ``"generated"``."""


@dataclass(frozen=True)
class Thresholds:
    """Limits every output must meet; None = not checked."""

    min_sqnr_db: float | None = None
    min_cosine: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    reference: str
    candidate: str
    reference_kind: str
    """``"onnx"`` or ``"pytorch"``."""
    provider: str
    exact: bool
    """True: ORT's fused DQ+MatMul runs at float accuracy (``accuracy_level 0``)."""
    seed: int
    inputs: tuple[InputInfo, ...]
    outputs: tuple[OutputMetrics, ...]
    thresholds: Thresholds
    failures: tuple[str, ...]
    """One line per violated threshold or non-finite output; empty when passed."""
    provider_check: tuple[OutputMetrics, ...] = ()
    """With ``provider="cuda"``: the candidate on CUDA against itself on CPU."""
    layers: LayerReport | None = None
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


def run_onnx(
    model: str | os.PathLike, feeds: Mapping[str, np.ndarray], provider: str = "cpu", exact: bool = True
) -> tuple[list[str], list[np.ndarray]]:
    """Output names and arrays of ``model`` on ``feeds`` (extra feeds are ignored)."""
    from ox_quant.runtime.session import make_session

    session = make_session(model, provider, exact=exact)
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feeds)
    if missing:
        raise OxQuantError(f"{Path(model).name} needs inputs the candidate does not have: {', '.join(sorted(missing))}")
    try:
        arrays = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OxQuantError(f"ONNX Runtime failed to run {Path(model).name}: {first}") from exc
    return [o.name for o in session.get_outputs()], list(arrays)


def _pair_outputs(ref_names, ref_arrays, cand_names) -> tuple[list[np.ndarray], str | None]:
    if ref_names is not None and set(cand_names) <= set(ref_names):
        by_name = dict(zip(ref_names, ref_arrays))
        return [by_name[n] for n in cand_names], None
    if len(ref_arrays) != len(cand_names):
        raise OxQuantError(f"the reference has {len(ref_arrays)} outputs, the candidate {len(cand_names)}")
    return list(ref_arrays), None if ref_names is None else "outputs matched by position (names differ)"


def _failures(metrics: tuple[OutputMetrics, ...], thresholds: Thresholds) -> list[str]:
    failures = []
    for m in metrics:
        if m.nonfinite:
            failures.append(f"{m.name}: {m.nonfinite} non-finite values in the candidate")
        if any(isinstance(v, float) and math.isnan(v) for v in (m.sqnr_db, m.cosine, m.rel_l2)):
            failures.append(f"{m.name}: metrics are NaN")
            continue
        if thresholds.min_sqnr_db is not None and not m.sqnr_db >= thresholds.min_sqnr_db:
            failures.append(f"{m.name}: SQNR {m.sqnr_db:.2f} dB < {thresholds.min_sqnr_db:g} dB")
        if thresholds.min_cosine is not None and not m.cosine >= thresholds.min_cosine:
            failures.append(f"{m.name}: cosine {m.cosine:.6f} < {thresholds.min_cosine:g}")
    return failures


def verify(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    provider: str = "cpu",
    exact: bool = True,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
    per_layer: bool = False,
) -> VerifyReport:
    """Compare ``candidate`` (ONNX) with ``reference`` (ONNX path or PyTorch SPEC).

    ``inputs``: an ``.npz`` path or a name -> array mapping; None generates them
    (``seed``, ``dims`` for symbolic dimensions, ``int_range`` for integer inputs).
    ``per_layer`` adds a ``LayerReport`` (ONNX reference only; see ``ox_quant.verification.per_layer``).
    """
    cand_path = Path(candidate)
    if not cand_path.is_file():
        raise OxQuantError(f"candidate model not found: {cand_path}")
    ref_is_onnx = looks_like_onnx(reference)
    if ref_is_onnx and not Path(reference).is_file():
        raise OxQuantError(f"reference model not found: {reference}")
    if per_layer and not ref_is_onnx:
        raise OxQuantError("--per-layer needs an ONNX reference (export the PyTorch model with `ox-quant export` first)")
    graph = load_graph(cand_path)
    if inputs is None:
        feeds, source = generate_inputs(graph, seed=seed, dims=dims, int_range=int_range), "generated"
    elif isinstance(inputs, Mapping):
        feeds, source = {k: np.asarray(v) for k, v in inputs.items()}, "given"
        missing = [s.name for s in input_specs(graph) if s.name not in feeds]
        if missing:
            raise OxQuantError(f"no values given for inputs: {', '.join(missing)}")
    else:
        feeds, source = load_inputs(inputs, graph), "file"
    ordered = [s.name for s in input_specs(graph)]
    infos = tuple(InputInfo(n, str(feeds[n].dtype), tuple(feeds[n].shape), source) for n in ordered)

    cand_names, cand_arrays = run_onnx(cand_path, feeds, provider, exact)
    notes: list[str] = []
    if ref_is_onnx:
        ref_names, ref_arrays = run_onnx(reference, feeds, provider, exact)
    else:
        from ox_quant.export.spec import load_spec
        from ox_quant.export.torch_run import run_torch

        module, _ = load_spec(str(reference))
        ref_names, ref_arrays = None, run_torch(module, [feeds[n] for n in ordered])
    paired, note = _pair_outputs(ref_names, ref_arrays, cand_names)
    if note:
        notes.append(note)
    metrics = tuple(compare(n, r, c) for n, r, c in zip(cand_names, paired, cand_arrays))
    thresholds = Thresholds(min_sqnr_db, min_cosine)
    failures = _failures(metrics, thresholds)

    provider_check: tuple[OutputMetrics, ...] = ()
    if provider == "cuda":
        _, cpu_arrays = run_onnx(cand_path, feeds, "cpu", exact)
        provider_check = tuple(compare(n, c, g) for n, c, g in zip(cand_names, cpu_arrays, cand_arrays))
    layers = None
    if per_layer:
        layers = attribute_errors(reference, cand_path, feeds, ref_arrays, provider=provider, exact=exact)
    return VerifyReport(
        reference=str(reference),
        candidate=str(cand_path),
        reference_kind="onnx" if ref_is_onnx else "pytorch",
        provider=provider,
        exact=exact,
        seed=seed,
        inputs=infos,
        outputs=metrics,
        thresholds=thresholds,
        failures=tuple(failures),
        provider_check=provider_check,
        layers=layers,
        notes=tuple(notes),
    )
