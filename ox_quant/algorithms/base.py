"""The quantizer seam: what every algorithm provides, and the calibration statistics it may use.

A quantizer maps a float weight ``W[K, N]`` (normalised as in ``ox_quant.core.config``) to a
``QuantizedWeight`` whose layout is fixed by the config (bits, granularity, symmetric); the
format writers pack that result, whatever algorithm chose it. ``choose_qparams`` picks the
scales and zero points alone (as torchao's ``choose_qparams_affine``); ``quantize`` is the
whole step (an algorithm such as GPTQ may also change the codes it rounds to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import DTypeLike

from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight
from ox_quant.errors import OxQuantError


@dataclass(frozen=True)
class SiteStats:
    """Calibration statistics of one weight site, gathered on the activations ``x[..., K]`` that
    multiply it: ``input_sq_mean[k] = mean(x[..., k] ** 2)`` over ``count`` rows (per-input-channel
    importance, as ggml's importance matrix). Filled by a calibration stage; round-to-nearest
    ignores it. Optional: ``input_abs_mean[k] = mean(|x[..., k]|)`` (AWQ) and
    ``hessian[K, K] = X^T X / count`` in float64 (GPTQ, AWQ's loss), ``X`` the ``[count, K]`` rows."""

    input_sq_mean: np.ndarray
    count: int
    input_abs_mean: np.ndarray | None = None
    hessian: np.ndarray | None = None

    def __post_init__(self) -> None:
        if np.asarray(self.input_sq_mean).ndim != 1:
            raise OxQuantError(f"calibration statistics must be one value per input channel [K], got shape "
                               f"{list(np.asarray(self.input_sq_mean).shape)}")
        if self.count < 1:
            raise OxQuantError(f"calibration statistics need at least one row, got {self.count}")


def scaled_stats(stats: SiteStats, s: np.ndarray) -> SiteStats:
    """Statistics of ``x / s`` given those of ``x``."""
    s = np.asarray(s, dtype=np.float64)
    return SiteStats(
        np.asarray(stats.input_sq_mean, dtype=np.float64) / s**2,
        stats.count,
        None if stats.input_abs_mean is None else np.asarray(stats.input_abs_mean, dtype=np.float64) / s,
        None if stats.hessian is None else np.asarray(stats.hessian, dtype=np.float64) / np.outer(s, s),
    )


class Quantizer(Protocol):
    """One quantization algorithm (registered in ``ox_quant.algorithms.registry``)."""

    name: str

    def choose_qparams(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QParams:
        """Scales (``scale_dtype[R, C]``) and zero points (``uint8[R, C]``) for ``weight[K, N]``."""
        ...

    def quantize(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None
    ) -> QuantizedWeight:
        """Codes, scales and zero points of ``weight[K, N]``."""
        ...


@runtime_checkable
class InputScaler(Protocol):
    """Optional extension of a quantizer: per-input-channel scales applied before quantizing.

    ``convert`` groups the weights that read one activation tensor ``x[..., K]`` (all of them
    must share one ``s``) and calls ``input_scales`` once per group with the current weights
    ``W_j[K, N_j]``, their configs and scale dtypes, and the statistics of ``x``. A returned
    ``s[K]`` (positive) is applied exactly in float by ``ox_quant.ir.input_scales``
    (``W_j <- diag(s) W_j``, ``x <- x / s`` folded into the op producing ``x``, or an inserted
    ``Mul``); each weight's ``quantize`` then gets its scaled weight and the statistics of
    ``x / s``. None: leave the group as it is.
    """

    def input_scales(
        self, weights: Sequence[np.ndarray], configs: Sequence[QuantConfig], scale_dtypes: Sequence[DTypeLike],
        stats: SiteStats | None,
    ) -> np.ndarray | None:
        ...
