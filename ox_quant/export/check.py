"""Checking an export at a second set of shapes, one dynamic symbol at a time when it fails.

``probe_pytorch`` runs PyTorch with every dynamic symbol changed (``second_sizes``): where
PyTorch itself fails, an inferred axis becomes static (the model fixes it) and a declared
one is an error. ``check_second_shape`` then runs the written model on ONNX Runtime at the
same shapes and compares it with PyTorch; on a failure or a mismatch it changes one symbol
at a time to name the axis at fault, and raises one line with the fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.core.metrics import OutputMetrics, compare
from ox_quant.errors import OxQuantError, one_line
from ox_quant.export.axes import AxisPlan, second_sizes


@dataclass(frozen=True)
class ShapeCheck:
    """ONNX Runtime against PyTorch with the dynamic symbols at ``sizes`` (example: ``example``)."""

    sizes: dict[str, int]
    example: dict[str, int]
    metrics: tuple[OutputMetrics, ...]


@dataclass(frozen=True)
class Probe:
    """The plan PyTorch accepts, the second sizes, inputs there and PyTorch's outputs."""

    plan: AxisPlan
    sizes: dict[str, int]
    inputs: tuple[Any, ...]
    expected: list[np.ndarray]


def _torch(module: Any, inputs: Sequence[Any]) -> tuple[list[np.ndarray] | None, str]:
    from ox_quant.export.torch_run import run_torch

    try:
        return run_torch(module, inputs), ""
    except OxQuantError as exc:
        return None, short_reason(str(exc).removeprefix("the PyTorch model failed on the inputs: "))


def static_fix(plan: AxisPlan, symbol: str) -> str:
    axes = plan.axes_of(symbol)
    spec = symbol if len(axes) > 1 else f"{axes[0].input}:{axes[0].axis}"
    declared = any(c.declared for c in axes)
    return "drop it from --dynamic-axis" if declared else f"--static-axis {spec}"


def probe_pytorch(module: Any, inputs: Sequence[Any], plan: AxisPlan) -> Probe:
    """See the module doc. ``sizes`` is empty when no dynamic symbol is left."""
    sizes = second_sizes(plan)
    if not sizes:
        return Probe(plan, {}, (), [])
    example = plan.example_sizes()
    expected, _ = _torch(module, plan.inputs_at(inputs, sizes))
    if expected is None or any(c.tentative for c in plan.dynamic):
        for symbol in list(sizes):
            alone = {symbol: sizes[symbol]}
            got, why = _torch(module, plan.inputs_at(inputs, alone))
            if got is not None:
                plan = plan.confirm(symbol, f"PyTorch runs at {symbol}={sizes[symbol]}")
                continue
            where = f"{plan.describe(symbol)}: the PyTorch model fails at {symbol}={sizes[symbol]} (example {example[symbol]}): {why}"
            if any(c.declared for c in plan.axes_of(symbol)):
                raise OxQuantError(f"{where}; the model fixes this size: {static_fix(plan, symbol)} or change the model")
            plan = plan.make_static(symbol, f"PyTorch fails at size {sizes[symbol]} ({why})")
        sizes = second_sizes(plan)
        if not sizes:
            return Probe(plan, {}, (), [])
        expected, why = _torch(module, plan.inputs_at(inputs, sizes))
        if expected is None:
            together = ", ".join(f"{s}={n}" for s, n in sizes.items())
            raise OxQuantError(
                f"the PyTorch model runs with each dynamic axis changed alone but not with all at once ({together}): "
                f"{why}; declare some static with --static-axis"
            )
    return Probe(plan, sizes, plan.inputs_at(inputs, sizes), expected)


def _ort(path: Path, names: Sequence[str], inputs: Sequence[Any]) -> tuple[list[np.ndarray] | None, list[str], str]:
    from ox_quant.runtime.session import make_session

    session = make_session(path, "cpu")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    wanted = {i.name for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    try:
        return session.run(None, {k: v for k, v in feeds.items() if k in wanted}), out_names, ""
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        return None, out_names, ort_reason(str(exc))


def _verdict(got, out_names, expected, min_sqnr_db: float | None) -> tuple[tuple[OutputMetrics, ...], str]:
    """Metrics and the first disagreement ("" when every output is close enough)."""
    if len(got) != len(expected):
        return (), f"{len(got)} outputs where PyTorch returns {len(expected)}"
    metrics = []
    for name, ref, cand in zip(out_names, expected, got, strict=True):
        if np.shape(ref) != np.shape(cand):
            return (), f"output {name!r} has shape {list(np.shape(cand))} where PyTorch gives {list(np.shape(ref))}"
        metrics.append(compare(name, ref, cand))
    if min_sqnr_db is not None:
        for m in metrics:
            if m.nonfinite or m.sqnr_db < min_sqnr_db:
                return tuple(metrics), f"output {m.name!r} SQNR {m.sqnr_db:.2f} dB < {min_sqnr_db:g} dB against PyTorch"
    return tuple(metrics), ""


def _fix(plan: AxisPlan, symbol: str, example_size: int) -> str:
    hint = f"{static_fix(plan, symbol)}, or change the model"
    if example_size == 1:
        hint = f"export from an example with {symbol} >= 2, {hint}"
    return f"fix: {hint}"


def check_symbolic(plan: AxisPlan, onnx_inputs) -> None:
    """Every dynamic axis must be symbolic in the written model (the exporter may fix one)."""
    dims = {t.name: t.shape for t in onnx_inputs}
    example = plan.example_sizes()
    for c in plan.dynamic:
        symbol = c.name
        assert symbol is not None  # plan.dynamic holds the named axes only
        shape = dims.get(c.input)
        if shape is not None and isinstance(shape[c.axis], int):
            raise OxQuantError(
                f"{plan.describe(symbol)}: the exporter fixed this axis at {shape[c.axis]} (the model branches on "
                f"or computes from its size); {_fix(plan, symbol, example[symbol])}"
            )


def check_second_shape(
    module: Any, path: Path, names: Sequence[str], inputs: Sequence[Any], probe: Probe, min_sqnr_db: float | None
) -> ShapeCheck:
    """See the module doc."""
    plan = probe.plan
    example = plan.example_sizes()
    got, out_names, why = _ort(path, names, probe.inputs)
    metrics: tuple[OutputMetrics, ...] = ()
    if got is not None:
        metrics, why = _verdict(got, out_names, probe.expected, min_sqnr_db)
        if not why:
            return ShapeCheck(dict(probe.sizes), {s: example[s] for s in probe.sizes}, metrics)
    culprit, culprit_why, ran = None, why, got is not None
    for symbol, size in probe.sizes.items():  # one symbol at a time, to name the axis at fault
        alone = plan.inputs_at(inputs, {symbol: size})
        expected, _ = _torch(module, alone)
        got, out_names, reason = _ort(path, names, alone)
        if got is not None and expected is not None:
            _, reason = _verdict(got, out_names, expected, min_sqnr_db)
        if reason:
            culprit, culprit_why, ran = symbol, reason, got is not None
            break
    if culprit is None:
        together = ", ".join(f"{s}={n}" for s, n in probe.sizes.items())
        raise OxQuantError(
            f"the exported model fails with {together} together (each alone runs): {why}; "
            "declare some axes static with --static-axis"
        )
    size, was = probe.sizes[culprit], example[culprit]
    verb = "disagrees with PyTorch" if ran else "does not run"
    raise OxQuantError(
        f"{plan.describe(culprit)}: the exported model {verb} at {culprit}={size} (exported at {was}): "
        f"{culprit_why}; {_fix(plan, culprit, was)}"
    )


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
_ORT_NOISE = (
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),  # status prefixes, nested ones too
    re.compile(r"/\S+\.(?:h|cc|cpp):\d+ "),  # source locations
    re.compile(r"(?:virtual )?[\w:*&<>]*\s?onnxruntime::[\w:~]+\([^)]*\)(?: const)?\s*"),  # C++ signatures
    re.compile(r"^.*? was false\. "),  # the failed condition, restated by the message
)


def ort_reason(text: str) -> str:
    """ONNX Runtime's run error without source paths and signatures: ``Reshape node
    '/att/Reshape_1': The input tensor cannot be reshaped ...``."""
    match = _ORT_NODE.search(text)
    head, message = (f"{match.group(1)} node {match.group(2)!r}: ", match.group(3)) if match else ("", text)
    for pattern in _ORT_NOISE:
        message = pattern.sub("", message.strip())
    return one_line(head + message, 240)


def short_reason(text: str) -> str:
    first = next((line.strip() for line in text.strip().splitlines() if line.strip()), "")
    return one_line(first, 240)
