"""Resolving a model SPEC to a PyTorch factory.

A SPEC is one of

* ``path/to/file.py:factory`` -- a Python file and a function in it;
* ``package.module:factory`` -- an importable module and a function in it;
* ``NAME`` -- a model registered in the ``ox_quant.registries`` entry-point group (ox-quant's
  own zoo, ``ox_quant_models.REGISTRY``: e.g. ``toy-mlp``).

A factory takes no arguments and returns ``(module, example_inputs)``: a
``torch.nn.Module`` and a tuple of example input tensors (a single tensor is accepted
and wrapped). ``load_spec`` puts the module in eval mode.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ox_quant.errors import OxQuantError

Factory = Callable[[], Any]


def looks_like_onnx(text: str | os.PathLike) -> bool:
    """True when ``text`` names an ONNX file (by suffix), not a SPEC."""
    return str(text).lower().endswith(".onnx")


REGISTRY_GROUP = "ox_quant.registries"


def _registry() -> dict[str, str]:
    """Registered model names -> ``"module:factory"``, from every installed package's mapping
    in the ``ox_quant.registries`` entry-point group (ox-quant's own zoo is one of them)."""
    from importlib.metadata import entry_points

    names: dict[str, str] = {}
    for entry in sorted(entry_points(group=REGISTRY_GROUP), key=lambda e: e.name):
        try:
            names.update(entry.load())
        except Exception:  # a broken third-party registry must not break SPEC files and modules
            continue
    return names


def _load_file_module(path: Path):
    if not path.is_file():
        raise OxQuantError(f"model spec file not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_ox_quant_spec_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise OxQuantError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise OxQuantError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise OxQuantError(f"cannot import module {name!r}: {exc}") from exc
    except Exception as exc:
        raise OxQuantError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def resolve_factory(spec: str) -> Factory:
    """The factory function that ``spec`` names. Raises ``OxQuantError`` when there is none."""
    spec = spec.strip()
    if not spec:
        raise OxQuantError("empty model spec")
    target, colon, attr = spec.rpartition(":")
    if not colon:
        registry = _registry()
        if spec not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise OxQuantError(
                f"unknown model {spec!r}: give FILE.py:FACTORY, package.module:FACTORY "
                f"or a registered name ({known})"
            )
        target, _, attr = registry[spec].rpartition(":")
        module = _import_module(target)
    elif target.endswith(".py") or "/" in target or os.sep in target:
        module = _load_file_module(Path(target))
    else:
        module = _import_module(target)
    if not attr.isidentifier():
        raise OxQuantError(f"model spec {spec!r}: {attr!r} is not a function name")
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise OxQuantError(f"model spec {spec!r}: {attr!r} is not a callable in {target}")
    return factory


def load_spec(spec: str):
    """Call the factory named by ``spec``: ``(module in eval mode, tuple of input tensors)``."""
    import torch

    factory = resolve_factory(spec)
    try:
        result = factory()
    except OxQuantError:
        raise
    except Exception as exc:
        raise OxQuantError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise OxQuantError(f"model factory {spec!r} must return (module, example_inputs)")
    module, inputs = result
    if not isinstance(module, torch.nn.Module):
        raise OxQuantError(f"model factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise OxQuantError(f"model factory {spec!r}: example_inputs must be a tuple of tensors")
    return module.eval(), tuple(inputs)
