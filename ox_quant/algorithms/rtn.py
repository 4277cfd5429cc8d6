"""Round-to-nearest, the reference composition: ``choose_qparams`` then ``quantize_with``
(``ox_quant.core.quantize``, held to its slow reference by tests)."""

from __future__ import annotations

import numpy as np

from ox_quant.algorithms.base import Needs, SiteStats
from ox_quant.core.config import QuantConfig
from ox_quant.core.quantize import QParams, QuantizedWeight, choose_qparams, quantize


class RoundToNearest:
    """Scales from each group's range, codes rounded to nearest; calibration statistics unused."""

    name = "rtn"
    needs = Needs.NONE
    sequential = False

    def choose_qparams(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None = None
    ) -> QParams:
        return choose_qparams(weight, config, scale_dtype)

    def quantize(
        self, weight: np.ndarray, config: QuantConfig, scale_dtype: np.dtype, stats: SiteStats | None = None
    ) -> QuantizedWeight:
        return quantize(weight, config, scale_dtype=scale_dtype)
