"""Turning report dataclasses into JSON-ready values.

Non-finite floats have no JSON spelling: ``inf`` / ``-inf`` / ``nan`` become ``null``
(an SQNR of ``null`` with ``max_abs_err == 0`` means the outputs are identical).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Dataclasses -> dicts (properties not included), tuples -> lists, non-finite -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_jsonable(value.item())
    return value
