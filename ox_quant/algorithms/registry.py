"""The quantization algorithms ox-quant knows, by the name ``QuantConfig.algorithm`` uses.

Adding an algorithm: one module implementing ``ox_quant.algorithms.base.Quantizer`` (and,
when it rescales input channels before quantizing, ``InputScaler``) and one entry in
:data:`QUANTIZERS`.
"""

from __future__ import annotations

from ox_quant.algorithms.awq import AWQ
from ox_quant.algorithms.base import Quantizer
from ox_quant.algorithms.gptq import GPTQ
from ox_quant.algorithms.hqq import HalfQuadratic
from ox_quant.algorithms.mse import MseSearch
from ox_quant.algorithms.rtn import RoundToNearest
from ox_quant.errors import OxQuantError

QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        RoundToNearest(),
        MseSearch(),
        HalfQuadratic(),
        GPTQ("gptq", act_order=True),  # act-order measured better on every config of tests/test_gptq.py
        GPTQ("gptq-noact", act_order=False),
        AWQ(),
    )
}


def get_quantizer(name: str) -> Quantizer:
    """The registered quantizer called ``name``; ``OxQuantError`` naming the known ones otherwise."""
    try:
        return QUANTIZERS[name]
    except (KeyError, TypeError):
        raise OxQuantError(
            f"unknown quantization algorithm {name!r}: choose from {', '.join(sorted(QUANTIZERS))}"
        ) from None
