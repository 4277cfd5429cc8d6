"""Export a torch module to an ONNX file that ONNX Runtime 1.31 loads.

Weights stay initializers (the quantizer looks for MatMul/Gemm weights that are
initializers). The IR version is capped at ``MAX_IR_VERSION``: onnx 1.23 writes
IR 14 by default, which ORT 1.31 refuses.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

MAX_IR_VERSION = 10


TORCHSCRIPT_OPSET = 17  # written with IR version 8


def _cap_ir_version(model) -> None:
    """Lower an ``onnx_ir.Model``'s IR version to ``MAX_IR_VERSION`` (never below its opsets' need)."""
    import onnx

    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = max(needed, min(model.ir_version, MAX_IR_VERSION))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_onnx(
    module: Any,
    example_inputs: tuple[Any, ...],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    dynamo: bool = True,
) -> Path:
    """Write ``module`` to ``path`` (a single file; fine below 2 GB).

    ``dynamic_axes`` maps an input or output name to ``{axis: dim_name}``. ``dynamo``
    selects ``torch.onnx.export(dynamo=True)`` (opset 18+); ``False`` uses the
    TorchScript exporter at opset 17, which is several times faster on large models
    (SmolLM2-135M: 23 s against 170 s on 2 cores). The file is written under a
    temporary name and renamed into place.
    """
    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent, prefix=f".{out.stem}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                dynamic_shapes = None
                if dynamic_axes:
                    dynamic_shapes = tuple(
                        {axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes.get(name, {})} or None
                        for name in input_names
                    )
                program = torch.onnx.export(
                    module, example_inputs, input_names=list(input_names),
                    output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                    dynamo=True, external_data=False, verbose=False,
                )
                _cap_ir_version(program.model)
                program.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(
                    module, example_inputs, str(tmp), input_names=list(input_names),
                    output_names=list(output_names), dynamic_axes=dict(dynamic_axes or {}),
                    dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                )
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
