"""Locating and registering ox-quant's native custom-op library (see custom_ops/)."""

from __future__ import annotations

from ox_quant.errors import OxQuantError


def register_library(options, provider: str = "cpu") -> None:
    raise OxQuantError(
        "this model uses ox-quant custom ops (domain ox_quant) but the custom-op library is not built"
    )
