"""PP-OCRv4 text-line recogniser (ONNX only), from the PyPI package ``rapidocr-onnxruntime``.

The model maps ``x [B, 3, 48, W] float32`` (RGB scaled to [-1, 1]) to per-column
character probabilities ``[B, W/8, 6625]``; class 0 is the CTC blank, classes
1..6623 are the lines of the ``character`` metadata entry and the last class is a
space. Its weights are stored in Constant nodes and its opset is 12; :func:`prepare`
writes a copy with them hoisted into initializers (so that the quantizer finds MatMul
and Conv weights) and converted to opset ``PREPARED_OPSET`` with ``onnx.version_converter``
(DequantizeLinear with ``block_size`` and INT4 needs opset 21).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ox_quant.errors import OxQuantError
from ox_quant_models._locate import package_file

DIST = "rapidocr-onnxruntime"
MODULE = "rapidocr_onnxruntime"
REC_MODEL = "models/ch_PP-OCRv4_rec_infer.onnx"
DET_MODEL = "models/ch_PP-OCRv4_det_infer.onnx"  # text detector (DB), ``models/tasks/ocr_aux.py``
CLS_MODEL = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"  # 0/180 degree orientation classifier
HEIGHT = 48
MIN_WIDTH = 320
BLANK = "<blank>"
PREPARED_OPSET = 21


def onnx_path() -> Path:
    """The package's recogniser, as shipped (weights in Constant nodes)."""
    return package_file(DIST, MODULE, REC_MODEL)


def characters(model: str | os.PathLike | None = None) -> list[str]:
    """Class index -> character: ``[BLANK] + metadata 'character' lines + [' ']``."""
    import onnx

    path = Path(model) if model is not None else onnx_path()
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise OxQuantError(f"{path.name} has no 'character' metadata: is it a PP-OCR recogniser?")
    return [BLANK, *meta["character"].splitlines(), " "]


def hoist_constants(model) -> int:
    """Move tensor-valued Constant nodes of ``model.graph`` into initializers; returns how many."""
    graph = model.graph
    kept = []
    moved = 0
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attrs) == {"value"}:
            tensor = attrs["value"].t
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def package_model(relative: str) -> Path:
    """Another model of the package (``DET_MODEL``, ``CLS_MODEL``), as shipped."""
    return package_file(DIST, MODULE, relative)


def prepare(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write the recogniser (or ``source``, another PP-OCR ONNX) to ``out``: Constant weights
    as initializers, opset 21 (atomic)."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(source if source is not None else onnx_path()))
    proto = version_converter.convert_version(proto, PREPARED_OPSET)
    hoist_constants(proto)  # after conversion, which adds Constant nodes (e.g. ReduceMean axes)
    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=target.parent, prefix=f".{target.stem}.")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
