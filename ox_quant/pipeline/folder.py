"""Converting an LLM folder (``ox_quant.runtime.llm_folder``): the model quantized, every other
file (``genai_config.json``, tokenizer files) copied, the result a complete folder.

The key-value cache tensors are graph inputs and outputs (activations), never weights, so
the conversion of ``model.onnx`` is the ordinary one. The new folder is written under a
temporary name beside ``output`` and renamed into place: no half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ox_quant.errors import OxQuantError
from ox_quant.pipeline.convert import ConvertOptions, ConvertReport, convert
from ox_quant.runtime.llm_folder import model_external_files, read_folder


def convert_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: ConvertOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calibration_progress: Callable[[str], None] | None = None,
) -> tuple[ConvertReport, list[str]]:
    """Quantize ``input_dir``'s model into ``output_dir`` (must not exist, or be an empty folder)
    and copy the other files. Returns the model's report and the names of the copied files."""
    folder = read_folder(input_dir)
    options = options or ConvertOptions()
    if options.merge_siblings is None:  # a decoder's q/k/v and gate/up: one kernel each (docs/llm-deploy.md)
        options = replace(options, merge_siblings=True)
    src, out = Path(input_dir), Path(output_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise OxQuantError(f"output folder is the input folder ({src}): choose another -o")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OxQuantError(f"{out} exists and is not an empty folder")
    if not out.parent.is_dir():
        raise OxQuantError(f"output directory {out.parent} does not exist")
    skip = {folder.model.name} | {p.name for p in model_external_files(folder.model)}
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = convert(folder.model, scratch / folder.model.name, options, progress, calibration_progress)
        copied = []
        for entry in sorted(src.iterdir()):
            if entry.name in skip or not entry.is_file():
                continue
            shutil.copy2(entry, scratch / entry.name)
            copied.append(entry.name)
        if out.exists():
            out.rmdir()
        os.replace(scratch, out)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    final = out / folder.model.name
    data = report.external_data and out / report.external_data.name
    return replace(report, output=final, external_data=data or None), copied
