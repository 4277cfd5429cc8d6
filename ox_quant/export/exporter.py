"""Exporting a PyTorch module to ONNX that the installed ONNX Runtime loads, and checking it.

``export_model`` tries ``torch.onnx.export(dynamo=True)`` (the onnxscript-based exporter)
and falls back to the TorchScript exporter when that raises, recording why in the report.
It then lowers the IR version to what onnxruntime loads, writes the model (external data
for large models) to a temporary name in the output directory, runs it on ONNX Runtime with
the example inputs and again with every dynamic axis at a second size (``ox_quant.export.check``)
to compare with PyTorch, and only then renames it into place.

Dynamic axes are inferred from the example inputs' names and shapes (``ox_quant.export.axes``)
unless given. The exporters' output is kept off the terminal (``ox_quant.export.log``): a
failure raises ``ExportError``, one line plus the log.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.core.metrics import OutputMetrics, compare
from ox_quant.errors import OxQuantError
from ox_quant.export.axes import AxisChoice, AxisPlan, apply_static, declared_axes, infer_axes
from ox_quant.export.check import ShapeCheck, check_second_shape, check_symbolic, probe_pytorch
from ox_quant.export.log import Captured, ExportError, captured, exporter_reason, format_failure

DEFAULT_OPSET = 21
"""Opset 21: DequantizeLinear with ``block_size`` and INT4/UINT4, as the quantizer needs."""
EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Parameters above this many bytes go to an external data file when not told otherwise."""
DEFAULT_CHECK_MIN_SQNR = 60.0


@dataclass(frozen=True)
class DynamicAxis:
    """Axis ``axis`` of input ``input`` has the symbolic size ``name``."""

    input: str
    axis: int
    name: str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ExportReport:
    """What ``export_model`` wrote and how close it is to PyTorch."""

    output: str
    exporter: str
    """``"dynamo"`` or ``"torchscript"`` (the fallback)."""
    fallback_reason: str | None
    opset: int
    ir_version: int
    external_data: bool
    optimized: bool
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    matmul_weights: int
    """MatMul/Gemm nodes whose weight (input 1) is an initializer."""
    matmul_nodes: int
    check: tuple[OutputMetrics, ...]
    check_min_sqnr_db: float | None
    """None when the check was not run."""
    axes: tuple[AxisChoice, ...] = ()
    """Every input axis: dynamic (symbol) or static, and why."""
    shape_check: ShapeCheck | None = None
    """ONNX Runtime vs PyTorch with the dynamic axes at second sizes; None when not run."""
    log: str = ""
    """What the exporters printed (kept off the terminal)."""

    @property
    def check_passed(self) -> bool:
        """True when every output's SQNR reaches the threshold (or the check was skipped)."""
        if self.check_min_sqnr_db is None:
            return True
        return all(m.nonfinite == 0 and m.sqnr_db >= self.check_min_sqnr_db for m in self.check)

    @property
    def dynamic_axes(self) -> tuple[DynamicAxis, ...]:
        """Input axes that ended up symbolic in the written model."""
        return tuple(
            DynamicAxis(t.name, i, str(d)) for t in self.inputs for i, d in enumerate(t.shape) if not isinstance(d, int)
        )


def parse_dynamic_axis(text: str) -> DynamicAxis:
    """``"INPUT:AXIS=NAME"`` (e.g. ``input_ids:1=sequence``) -> ``DynamicAxis``."""
    head, sep, name = text.rpartition("=")
    input_name, colon, axis_text = head.rpartition(":")
    try:
        if not sep or not colon or not input_name or not name:
            raise ValueError
        axis = int(axis_text)
    except ValueError:
        raise OxQuantError(f"dynamic axis {text!r}: expected INPUT:AXIS=NAME, e.g. input:0=batch") from None
    return DynamicAxis(input_name, axis, name)


def default_input_names(module: Any, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``module.forward``."""
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return [f"input_{i}" for i in range(count)]


def auto_dynamic_axes(names: Sequence[str], inputs: Sequence[Any]) -> list[DynamicAxis]:
    """The dynamic axes ``ox_quant.export.axes.infer_axes`` guesses (before any check)."""
    return [DynamicAxis(c.input, c.axis, c.name) for c in infer_axes(names, inputs).dynamic if c.name]


def _tensor_infos(values) -> tuple[TensorInfo, ...]:
    from onnx import helper

    infos = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
        )
        infos.append(TensorInfo(value.name, str(np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))), shape))
    return tuple(infos)


def _count_matmul_weights(graph) -> tuple[int, int]:
    initializers = {t.name for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    return sum(1 for n in nodes if len(n.input) > 1 and n.input[1] in initializers), len(nodes)


_FX_ARGS = re.compile(r"args = \(%(\w+), %(\w+)")


def name_folded_weights(program: Any) -> int:
    """Give MatMul/Gemm weights that constant folding produced (``val_12`` = the folded
    ``Transpose`` of a Linear's ``[N, K]`` weight) the name of their parameter plus ``.T``,
    e.g. ``q.weight.T``, using the exporter's FX metadata. Returns how many were renamed."""
    placeholders = program.exported_program.graph_signature.inputs_to_parameters
    graph = program.model.graph
    renamed = 0
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        if not weight.is_initializer() or weight.name in placeholders.values():
            continue
        match = _FX_ARGS.search(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        if not match or match.group(2) not in placeholders or "linear" not in node.metadata_props.get(
            "pkg.torch.onnx.fx_node", ""
        ):
            continue
        new_name = placeholders[match.group(2)] + ".T"
        if new_name in graph.initializers or len(weight.uses()) != 1:
            continue
        graph.initializers.pop(weight.name)
        weight.name = new_name
        graph.register_initializer(weight)
        renamed += 1
    return renamed


def _dynamic_axes(axes) -> dict[str, dict[int, str]]:
    """``{input: {axis: name}}`` as both exporters take ``dynamic_axes``."""
    dynamic: dict[str, dict[int, str]] = {}
    for axis in axes:
        dynamic.setdefault(axis.input, {})[axis.axis] = axis.name
    return dynamic


def _export_dynamo(module, inputs, path: Path, names, output_names, axes, opset, optimize, external) -> None:
    import torch

    from ox_quant.runtime.session import max_ir_version

    dynamic = _dynamic_axes(axes)
    program = torch.onnx.export(
        module,
        tuple(inputs),
        dynamo=True,
        input_names=list(names),
        output_names=list(output_names),
        dynamic_axes=dynamic or None,
        opset_version=opset,
        optimize=optimize,
        verbose=False,
        external_data=external,
    )
    assert program is not None  # dynamo=True always returns an ONNXProgram
    if optimize:
        name_folded_weights(program)
    program.model.ir_version = min(program.model.ir_version, max_ir_version())
    program.save(str(path), external_data=external)


def _export_torchscript(module, inputs, path: Path, names, output_names, axes, opset, external) -> None:
    import onnx
    import torch

    from ox_quant.runtime.session import max_ir_version

    dynamic = _dynamic_axes(axes)
    try:  # the TorchScript exporter stops at an older opset than dynamo (20 in torch 2.13)
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as ts_max
    except ImportError:
        ts_max = opset
    opset = min(opset, ts_max)
    scratch = path.with_name(path.name + ".ts")
    scratch.mkdir()
    try:
        ts_path = scratch / path.name
        torch.onnx.export(
            module,
            tuple(inputs),
            str(ts_path),
            dynamo=False,
            input_names=list(names),
            output_names=list(output_names),
            dynamic_axes=dynamic or None,
            opset_version=opset,
        )
        proto = onnx.load(str(ts_path))
        proto.ir_version = min(proto.ir_version, max_ir_version())
        if external:
            onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save(proto, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check(path: Path, names: Sequence[str], inputs, expected: list[np.ndarray]) -> tuple[OutputMetrics, ...]:
    from ox_quant.runtime.session import make_session

    session = make_session(path, "cpu")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
    feed_names = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v for k, v in feeds.items() if k in feed_names})
    out_names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise OxQuantError(f"the exported model has {len(got)} outputs, PyTorch returned {len(expected)}")
    return tuple(compare(name, ref, cand) for name, ref, cand in zip(out_names, expected, got, strict=True))


def export_model(
    module: Any,
    example_inputs: Sequence[Any],
    output: str | os.PathLike,
    *,
    dynamic_axes: Sequence[DynamicAxis] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    external_data: bool | None = None,
    check: bool = True,
    check_min_sqnr_db: float = DEFAULT_CHECK_MIN_SQNR,
    dynamo: bool = True,
    static_axes: Sequence[str] = (),
) -> ExportReport:
    """Export ``module`` to ``output`` (see module doc).

    ``dynamic_axes=None`` infers them (``ox_quant.export.axes``); ``[]`` exports static shapes;
    ``static_axes`` (``INPUT:AXIS`` or an axis name) removes some. With ``check``, PyTorch is
    first run with every dynamic axis at a second size (inferred axes it rejects become
    static), and the written model must match PyTorch there too, else ``ExportError`` names
    the axis and nothing is written.
    ``external_data=None`` stores weights externally (``OUTPUT.data``) above 1 GiB.
    ``optimize`` runs the onnxscript optimizer (constant folding, dead code), which keeps
    weights as initializers, then names folded weights after their parameters
    (``name_folded_weights``). ``dynamo=False`` goes straight to the TorchScript exporter.
    """
    import onnx

    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise OxQuantError(f"output {out} must end with .onnx")
    if not out.parent.is_dir():
        raise OxQuantError(f"output directory {out.parent} does not exist")
    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise OxQuantError(f"opset {opset} is not supported (7..{onnx.defs.onnx_opset_version()})")
    inputs = tuple(example_inputs)
    names = list(input_names) if input_names else default_input_names(module, len(inputs))
    if len(names) != len(inputs):
        raise OxQuantError(f"{len(names)} input names for {len(inputs)} example inputs")
    for axis in dynamic_axes or ():
        if axis.input not in names:
            raise OxQuantError(f"dynamic axis for unknown input {axis.input!r} (inputs: {', '.join(names)})")
        rank = inputs[names.index(axis.input)].dim()
        if not 0 <= axis.axis < rank:
            raise OxQuantError(f"dynamic axis {axis.axis} out of range for input {axis.input!r} of rank {rank}")
    plan = infer_axes(names, inputs) if dynamic_axes is None else declared_axes(names, inputs, dynamic_axes)
    plan = apply_static(plan, static_axes)
    failure: BaseException | None = None
    with captured() as sink:
        try:
            report = _export_checked(
                module.eval(), inputs, out, names, output_names, plan, opset, optimize, external_data,
                check, check_min_sqnr_db, dynamo, sink,
            )
        except Exception as exc:  # re-raised below, once the capture has ended
            failure = exc
    if failure is not None:
        if isinstance(failure, OxQuantError):
            raise ExportError(str(failure), sink.text + format_failure(failure)) from failure
        raise failure
    return replace(report, log=sink.text)


def _export_checked(
    module, inputs, out: Path, names, output_names, plan: AxisPlan, opset, optimize, external_data,
    check: bool, check_min_sqnr_db: float, dynamo: bool, sink: Captured,
) -> ExportReport:
    """``export_model`` after argument checks, inside the output capture."""
    import onnx

    from ox_quant.export.torch_run import run_torch

    expected = run_torch(module, inputs)
    outs = list(output_names) if output_names else (
        ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    )
    if len(outs) != len(expected):
        raise OxQuantError(f"{len(outs)} output names for {len(expected)} model outputs")
    probe = None
    if check:
        probe = probe_pytorch(module, inputs, plan)
        plan = probe.plan
    else:
        plan = plan.drop_tentative("not checked at other sizes (--no-check)")
    axes = [DynamicAxis(c.input, c.axis, c.name) for c in plan.dynamic if c.name]
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    param_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    external = param_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data

    shape_check = None
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_path = scratch / out.name
        exporter, fallback_reason = "torchscript", None
        if dynamo:
            try:
                _export_dynamo(module, inputs, tmp_path, names, outs, axes, opset, optimize, external)
                exporter = "dynamo"
            except Exception as exc:  # the exporter raises many unrelated types
                fallback_reason = exporter_reason(exc)
                sink.add("dynamo exporter failed, falling back to TorchScript:\n" + format_failure(exc))
                for leftover in scratch.iterdir():
                    leftover.unlink()
        if exporter == "torchscript":
            try:
                _export_torchscript(module, inputs, tmp_path, names, outs, axes, opset, external)
            except Exception as exc:
                before = f"dynamo exporter: {fallback_reason}; " if fallback_reason else ""
                raise OxQuantError(f"export failed ({before}TorchScript exporter: {exporter_reason(exc)})") from exc
        proto = onnx.load(str(tmp_path), load_external_data=False)
        onnx_inputs = _tensor_infos(proto.graph.input)
        metrics = _check(tmp_path, names, inputs, expected) if check else ()
        example_ok = all(m.nonfinite == 0 and m.sqnr_db >= check_min_sqnr_db for m in metrics)
        if probe is not None and probe.sizes and example_ok:  # a mismatch at the example is reported as such
            check_symbolic(plan, onnx_inputs)
            shape_check = check_second_shape(module, tmp_path, names, inputs, replace(probe, plan=plan), check_min_sqnr_db)
        data_files = [p for p in scratch.iterdir() if p.name != out.name]
        for data_file in data_files:  # weights first, so the model never points at nothing
            os.replace(data_file, out.parent / data_file.name)
        os.replace(tmp_path, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    weights, matmuls = _count_matmul_weights(proto.graph)
    default_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return ExportReport(
        output=str(out),
        exporter=exporter,
        fallback_reason=fallback_reason,
        opset=int(default_opset),
        ir_version=int(proto.ir_version),
        external_data=bool(data_files),
        optimized=optimize and exporter == "dynamo",
        inputs=onnx_inputs,
        outputs=_tensor_infos(proto.graph.output),
        matmul_weights=weights,
        matmul_nodes=matmuls,
        check=metrics,
        check_min_sqnr_db=check_min_sqnr_db if check else None,
        axes=plan.choices,
        shape_check=shape_check,
    )


def export_spec(spec: str, output: str | os.PathLike, **options: Any) -> ExportReport:
    """``export_model`` on the module and example inputs of a model SPEC (see ``ox_quant.export.spec``)."""
    from ox_quant.export.spec import load_spec

    module, inputs = load_spec(spec)
    return export_model(module, inputs, output, **options)
