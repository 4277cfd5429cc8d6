"""``verify``: how close a candidate ONNX model stays to a reference, in numbers.

The reference is an ONNX model or a PyTorch model SPEC (cross-framework check); the
candidate is an ONNX model (a float export or a quantized model). Both run on the same
inputs -- from an ``.npz`` file, or generated from the candidate's input specs with a
fixed seed (``ox_quant.verification.inputs``) -- and every candidate output is compared with the
reference output of the same name (or position, when the names differ) with
``ox_quant.core.metrics.compare``.

The report says what the models were fed (names, shapes, dtypes, value ranges, and how
generated inputs were drawn) and whether any threshold was checked: without
``min_sqnr_db``/``min_cosine`` the verdict is "no thresholds given", never "passed".
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ox_quant.core.metrics import OutputMetrics, compare
from ox_quant.errors import OxQuantError, one_line
from ox_quant.export.spec import looks_like_onnx
from ox_quant.verification.inputs import generate_inputs, input_specs, load_graph, load_inputs, value_rule
from ox_quant.verification.per_layer import LayerReport, attribute_errors


@dataclass(frozen=True)
class InputInfo:
    """One array both models were fed, and where it came from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    """``"file"``, ``"given"`` (arrays passed to ``verify``) or ``"generated"``."""
    generated: bool
    min: float | int | None
    """Smallest value fed (None for an empty array); ``max`` likewise."""
    max: float | int | None
    rule: str | None = None
    """For generated inputs, how they were drawn (e.g. ``integers in [0, 16) (default range ...)``)."""

    def describe(self) -> str:
        """``name dtype[2x16] in [lo, hi]`` plus the generation rule, for humans."""
        text = f"{self.name} {self.dtype}[{'x'.join(map(str, self.shape))}]"
        if self.min is not None:
            text += f" values {_num(self.min)}..{_num(self.max)}"
        return text + (f" ({self.rule})" if self.rule else "")


def _num(value: float | int | None) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def input_info(name: str, array: np.ndarray, source: str, rule: str | None = None) -> InputInfo:
    """Describe one fed array: dtype, shape, observed min and max."""
    lo = hi = None
    if array.size and array.dtype.kind in "biuf":
        lo, hi = array.min().item(), array.max().item()
        if array.dtype.kind == "b":
            lo, hi = int(lo), int(hi)
    return InputInfo(name, str(array.dtype), tuple(array.shape), source, source == "generated", lo, hi, rule)


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
        """No threshold violated and every output finite (True also when no threshold was given)."""
        return not self.failures

    @property
    def checked(self) -> bool:
        """A threshold (SQNR or cosine) was given, so ``passed`` means something about accuracy."""
        return self.thresholds.min_sqnr_db is not None or self.thresholds.min_cosine is not None

    @property
    def verdict(self) -> str:
        """``"failed"``, ``"passed"``, or ``"no thresholds given"`` (finite outputs, nothing checked)."""
        if self.failures:
            return "failed"
        return "passed" if self.checked else "no thresholds given"


def run_onnx(
    model: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    provider: str = "cpu",
    exact: bool = True,
    hint: str = "",
) -> tuple[list[str], list[np.ndarray]]:
    """Output names and arrays of ``model`` on ``feeds`` (extra feeds are ignored).

    A failure of the run (shapes or dtypes that do not fit, indices out of range) becomes
    one ``OxQuantError`` line: ONNX Runtime's reason without its prefix, then ``hint``."""
    from ox_quant.runtime.session import make_session

    session = make_session(model, provider, exact=exact)
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feeds)
    if missing:
        raise OxQuantError(f"{Path(model).name} needs inputs the candidate does not have: {', '.join(sorted(missing))}")
    try:
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported below, on one line
        arrays = session.run(None, {k: v for k, v in feeds.items() if k in wanted}, quiet)
    except Exception as exc:
        reason = _ORT_PREFIX.sub("", one_line(str(exc), limit=2000)) or type(exc).__name__
        raise OxQuantError(f"ONNX Runtime failed to run {Path(model).name}: {_short(reason)}{hint}") from exc
    return [o.name for o in session.get_outputs()], list(arrays)


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


def _short(reason: str) -> str:
    """ONNX Runtime's reason without the C++ source location it quotes before the message."""
    reason = re.sub(r"Status Message: \S+:\d+ \S+\(.*?\) .*? was false\. ", "Status Message: ", reason)
    return one_line(reason, limit=400)


def run_hint(infos: tuple[InputInfo, ...], inputs_path: str | None = None) -> str:
    """What to try when the models do not run on ``infos``: ``--dim``, ``--int-range``, ``--inputs``."""
    fed = ", ".join(f"{i.name} {i.dtype}[{'x'.join(map(str, i.shape))}]" for i in infos)
    if infos and all(i.generated for i in infos):
        tips = ["set symbolic dimensions with --dim NAME=VALUE"]
        if any(i.dtype.startswith(("int", "uint")) for i in infos):
            tips.append("integer ranges with --int-range LO:HI")
        tips.append("or pass real inputs with --inputs FILE.npz")
        return f" (generated inputs {fed}: {', '.join(tips)})"
    where = f" in {inputs_path}" if inputs_path else ""
    return f" (inputs {fed}{where}: give arrays of the shapes and dtypes the model takes with --inputs FILE.npz)"


def _pair_outputs(ref_names, ref_arrays, cand_names) -> tuple[list[np.ndarray], str | None]:
    if ref_names is not None and set(cand_names) <= set(ref_names):
        by_name = dict(zip(ref_names, ref_arrays, strict=True))
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
    specs = input_specs(graph)
    if inputs is None:
        feeds, source = generate_inputs(graph, seed=seed, dims=dims, int_range=int_range), "generated"
    elif isinstance(inputs, Mapping):
        feeds, source = {k: np.asarray(v) for k, v in inputs.items()}, "given"
        missing = [s.name for s in specs if s.name not in feeds]
        if missing:
            raise OxQuantError(f"no values given for inputs: {', '.join(missing)}")
    else:
        feeds, source = load_inputs(inputs, graph), "file"
    ordered = [s.name for s in specs]
    infos = tuple(
        input_info(s.name, feeds[s.name], source, value_rule(graph, s, int_range) if source == "generated" else None)
        for s in specs
    )
    hint = run_hint(infos, str(inputs) if source == "file" else None)

    cand_names, cand_arrays = run_onnx(cand_path, feeds, provider, exact, hint)
    notes: list[str] = []
    if ref_is_onnx:
        ref_names, ref_arrays = run_onnx(reference, feeds, provider, exact, hint)
    else:
        from ox_quant.export.spec import load_spec
        from ox_quant.export.torch_run import run_torch

        module, _ = load_spec(str(reference))
        try:
            ref_names, ref_arrays = None, run_torch(module, [feeds[n] for n in ordered])
        except OxQuantError as exc:
            raise OxQuantError(f"{exc}{hint}") from exc
    paired, note = _pair_outputs(ref_names, ref_arrays, cand_names)
    if note:
        notes.append(note)
    metrics = tuple(compare(n, r, c) for n, r, c in zip(cand_names, paired, cand_arrays, strict=True))
    thresholds = Thresholds(min_sqnr_db, min_cosine)
    failures = _failures(metrics, thresholds)

    provider_check: tuple[OutputMetrics, ...] = ()
    if provider == "cuda":
        _, cpu_arrays = run_onnx(cand_path, feeds, "cpu", exact, hint)
        provider_check = tuple(compare(n, c, g) for n, c, g in zip(cand_names, cpu_arrays, cand_arrays, strict=True))
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
