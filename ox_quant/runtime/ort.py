"""The one place ox-quant imports ONNX Runtime, and says in one line what to do when it is unusable.

Two PyPI packages provide the ``onnxruntime`` module: ``onnxruntime`` (CPU) and
``onnxruntime-gpu`` (CPU and CUDA). ox-quant works with either. Installed together they
write the same files into one ``onnxruntime/`` directory: the last one installed wins (a
package that depends on ``onnxruntime``, such as rapidocr or magika, silently replaces the
GPU build), and uninstalling one deletes files the other needs, leaving a directory that
imports as an empty namespace package (``module 'onnxruntime' has no attribute
'SessionOptions'``). :func:`load` detects these states and raises :class:`OxQuantError`
naming the command that repairs them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

from ox_quant.errors import OxQuantError, one_line

CPU, GPU = "onnxruntime", "onnxruntime-gpu"
DISTRIBUTIONS = (GPU, CPU)  # preferred first: a user who installed the GPU build wants it back
#: What every ox-quant use of the module needs; a broken install lacks them.
REQUIRED = ("InferenceSession", "SessionOptions", "get_available_providers")
INSTALL = f"pip install {CPU} (CPU) or pip install {GPU} (NVIDIA GPU)"


def installed(package_dirs: list[Path] | None = None) -> list[str]:
    """ONNX Runtime distributions installed (per their metadata), GPU first.

    With ``package_dirs`` (the directories the ``onnxruntime`` module was found in), only
    those installed into a directory holding one of them: the ones that share its files.
    """
    found = []
    for name in DISTRIBUTIONS:
        for dist in importlib.metadata.distributions(name=name):
            if package_dirs is None:
                found.append(name)
                break
            root = Path(str(dist.locate_file(""))).resolve()
            if any(Path(d).resolve().parent == root for d in package_dirs):
                found.append(name)
                break
    return found


def module_dirs() -> list[Path] | None:
    """The directories ``import onnxruntime`` reads (found without running its code); None if none."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return [Path(p) for p in locations] or None


def repair_command(owners: list[str]) -> str:
    """The shell command that restores a working ONNX Runtime for these installed distributions."""
    if len(owners) > 1:
        return f"pip uninstall -y {CPU} {GPU} && pip install {GPU} (or {CPU} for CPU only)"
    keep = owners[0] if owners else CPU
    return f"pip install --force-reinstall --no-deps {keep}"


def load() -> ModuleType:
    """The ``onnxruntime`` module, checked usable; OxQuantError with one line otherwise."""
    try:
        module = importlib.import_module("onnxruntime")
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":  # a file inside the package is missing
            owners = installed(module_dirs())
            raise OxQuantError(
                f"ONNX Runtime is installed incompletely ({one_line(str(exc), 120)}): run {repair_command(owners)}"
            ) from None
        owners = installed()
        if owners:
            raise OxQuantError(
                f"ONNX Runtime ({' and '.join(owners)}) is registered as installed but its onnxruntime module "
                f"is missing: run {repair_command(owners)}"
            ) from None
        raise OxQuantError(f"ONNX Runtime is not installed: run {INSTALL}") from None
    except ImportError as exc:
        raise OxQuantError(
            f"ONNX Runtime cannot be imported ({one_line(str(exc), 160)}): run {repair_command(installed(module_dirs()))}"
        ) from None
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        owners = installed([Path(p) for p in getattr(module, "__path__", [])] or None)
        if getattr(module, "__file__", None) is None:  # a directory without __init__.py
            what = f"its onnxruntime directory holds only leftover files (removing one of {CPU} and {GPU} deletes files both use)"
        else:
            what = f"module onnxruntime has no {missing[0]}"
        raise OxQuantError(f"ONNX Runtime is broken: {what}; run {repair_command(owners)}")
    return module


def cuda_hint() -> str:
    """Why ONNX Runtime's CUDA execution provider is unusable, and what to install (one clause)."""
    module = load()
    if "CUDAExecutionProvider" in module.get_available_providers():
        return "ONNX Runtime has its CUDA build but no CUDA device or runtime answers on this machine"
    owners = installed([Path(p) for p in getattr(module, "__path__", [])])
    if GPU in owners and CPU in owners:
        return (f"{CPU} was installed after {GPU} and replaced its files "
                f"(run pip uninstall -y {CPU} {GPU} && pip install {GPU})")
    if GPU in owners:
        return f"the installed {GPU} has no CUDA execution provider (run pip install --force-reinstall --no-deps {GPU})"
    return f"the installed ONNX Runtime is the CPU-only build (run pip uninstall -y {CPU} && pip install {GPU})"
