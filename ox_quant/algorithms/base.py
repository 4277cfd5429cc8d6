"""The quantizer seam: what every algorithm provides, and the calibration statistics it may use.

A quantizer maps a float weight ``W[K, N]`` (normalised as in ``ox_quant.core.config``) to a
``QuantizedWeight`` whose layout is fixed by the config (bits, granularity, symmetric); the
format writers pack that result, whatever algorithm chose it. ``choose_qparams`` picks the
scales and zero points alone (as torchao's ``choose_qparams_affine``); ``quantize`` is the
whole step (an algorithm such as GPTQ may also change the codes it rounds to).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import DTypeLike

from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight
from ox_quant.errors import OxQuantError


class Needs(str, enum.Enum):
    """What calibration an algorithm needs (``Quantizer.needs``).

    ``none``: nothing (data-free; calibration, if given, is not run for it). ``importance``:
    ``SiteStats.input_sq_mean`` / ``input_abs_mean`` (O(K) per site). ``hessian``: also
    ``SiteStats.hessian`` (O(K^2) per site).
    """

    NONE = "none"
    IMPORTANCE = "importance"
    HESSIAN = "hessian"

    def __str__(self) -> str:
        return self.value


def stats_bytes(k: int, hessian: bool) -> int:
    """Bytes of a site's statistics state: ``input_sq_mean`` and ``input_abs_mean`` (float64[K]
    each, 16 K bytes), plus the Hessian float64[K, K] (8 K^2 bytes) when asked for."""
    return 16 * k + (8 * k * k if hessian else 0)


@dataclass(frozen=True)
class SiteStats:
    """Calibration statistics of one weight site, gathered on the activations ``x[..., K]`` that
    multiply it, over ``count`` rows ``x_r`` (all leading axes of all feeds flattened):

    * ``input_sq_mean[k] = mean_r(x_r[k] ** 2)``: per-input-channel importance (as ggml's
      importance matrix), float64[K];
    * ``input_abs_mean[k] = mean_r(|x_r[k]|)`` (AWQ's activation scale), float64[K]; None when
      not gathered;
    * ``hessian = X^T X / count`` (float64[K, K], ``X[count, K]`` the rows): the second moment
      of the inputs; GPTQ's ``H = 2 X^T X`` is ``2 * count * hessian`` (a constant factor, which
      changes neither GPTQ's updates nor a damping relative to ``mean(diag(H))``). None unless
      the algorithm ``needs`` it;
    * ``samples``: calibration feeds the rows came from (0: unknown).

    The output error of a quantized ``W'`` on these rows is
    ``mean_r ||x_r (W' - W)||^2 = tr(dW^T hessian dW)`` (``ox_quant.calibration.stats``).
    Filled by a calibration stage; round-to-nearest ignores it.
    """

    input_sq_mean: np.ndarray
    count: int
    input_abs_mean: np.ndarray | None = None
    hessian: np.ndarray | None = None
    samples: int = 0

    def __post_init__(self) -> None:
        sq = np.asarray(self.input_sq_mean)
        if sq.ndim != 1:
            raise OxQuantError(f"calibration statistics must be one value per input channel [K], got shape "
                               f"{list(sq.shape)}")
        if self.count < 1:
            raise OxQuantError(f"calibration statistics need at least one row, got {self.count}")
        k = sq.shape[0]
        if self.input_abs_mean is not None and np.asarray(self.input_abs_mean).shape != (k,):
            raise OxQuantError(f"input_abs_mean must have shape [{k}], got {list(np.asarray(self.input_abs_mean).shape)}")
        if self.hessian is not None and np.asarray(self.hessian).shape != (k, k):
            raise OxQuantError(f"hessian must have shape [{k}, {k}], got {list(np.asarray(self.hessian).shape)}")

    @property
    def k(self) -> int:
        return int(np.asarray(self.input_sq_mean).shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes these statistics hold (the arrays)."""
        return sum(int(np.asarray(a).nbytes) for a in (self.input_sq_mean, self.input_abs_mean, self.hessian)
                   if a is not None)


def scaled_stats(stats: SiteStats, s: np.ndarray) -> SiteStats:
    """Statistics of ``x / s`` given those of ``x``."""
    s = np.asarray(s, dtype=np.float64)
    return SiteStats(
        np.asarray(stats.input_sq_mean, dtype=np.float64) / s**2,
        stats.count,
        None if stats.input_abs_mean is None else np.asarray(stats.input_abs_mean, dtype=np.float64) / s,
        None if stats.hessian is None else np.asarray(stats.hessian, dtype=np.float64) / np.outer(s, s),
        stats.samples,
    )


class Quantizer(Protocol):
    """One quantization algorithm (registered in ``ox_quant.algorithms.registry``)."""

    name: str
    needs: Needs
    """What calibration ``stats`` this algorithm uses (``Needs.NONE``: it is handed None or ignores it)."""
    sequential: bool
    """True: each weight's statistics must come from the model with the weights upstream of it
    already quantized by this algorithm (GPTQ); the sequential driver
    (``ox_quant.calibration.sequential``) quantizes level by level. False: one calibration pass
    over the float model serves every weight."""

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
