"""Running a PyTorch module on numpy or tensor inputs and flattening what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError


def flatten_outputs(value: Any) -> list[Any]:
    """Tensors of a module's return value in order: a tensor, or nested tuples / lists /
    dicts (dict values in insertion order) of tensors. ``None`` entries are dropped."""
    import torch

    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten_outputs(item)]
    kind = type(value).__name__
    hint = ""
    if kind.endswith("Cache"):
        from ox_quant.export.log import CACHE_HINT

        hint = f" ({CACHE_HINT})"
    raise OxQuantError(f"model returned a {kind}; expected tensors, tuples, lists or dicts of them{hint}")


def run_torch(module: Any, inputs: Sequence[Any]) -> list[np.ndarray]:
    """``module(*inputs)`` without gradients; inputs are tensors or numpy arrays (passed
    positionally), outputs come back as float/int numpy arrays in ``flatten_outputs`` order."""
    import torch

    tensors = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t)) for t in inputs]
    try:
        with torch.no_grad():
            result = module(*tensors)
    except OxQuantError:
        raise
    except Exception as exc:
        raise OxQuantError(f"the PyTorch model failed on the inputs: {type(exc).__name__}: {exc}") from exc
    return [t.detach().cpu().numpy() for t in flatten_outputs(result)]
