"""The automatic choice of an on-disk format for a weight: each format says which configs it can
hold and why not (``rejects`` of its module in ``ox_quant.formats``); this module picks one.

Each format's axis and block conventions:

=================  ==============================  ==========================================
granularity        MatMulNBits (com.microsoft)     DequantizeLinear (opset 21)
=================  ==============================  ==========================================
per-tensor         --                              scalar scale
per-channel        --                              ``axis=1``, scale ``[N]``
block B            ``block_size=B`` (2^n, 16..256)  ``axis=0, block_size=B``, scale ``[ceil(K/B), N]``
channel-group G    --                              ``axis=1``, scale ``[N]`` (each value repeated G times)
=================  ==============================  ==========================================

MatMulNBits takes bits 2, 4, 8 (ONNX Runtime's CPU kernels); DequantizeLinear takes
INT4/UINT4/INT8/UINT8, so 4 and 8 bits. ox-quant's own ``ox_quant.MatMulNBits`` (custom-op
library, ``custom_ops/``) takes any bits 2..8 and every granularity of a MatMul weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from ox_quant.core.config import Format, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats.custom_matmul import custom_block_and_group, custom_rejects  # noqa: F401 (re-exported)
from ox_quant.formats.gather_block_quantized import gather_rejects
from ox_quant.formats.matmulnbits import FLOAT_DTYPES, MATMULNBITS_BITS, MATMULNBITS_BLOCK_SIZES, matmulnbits_rejects  # noqa: F401
from ox_quant.formats.qdq import QDQ_BITS, qdq_rejects  # noqa: F401 (re-exported)
from ox_quant.formats.registry import FORMATS

#: GatherBlockQuantized and MatMulNBits over one stored tensor (a tied table; formats/tied.py)
TIED_FORMAT = "gather_block_quantized+matmulnbits"
WRITTEN_FORMATS = (*(f.name for f in FORMATS), TIED_FORMAT)


@dataclass(frozen=True)
class FormatChoice:
    """The format a weight is written in (one of ``WRITTEN_FORMATS``) and why."""

    format: str
    reason: str


def check_granularity_fits(config: QuantConfig, k: int, n: int, partial_block: bool = False) -> str | None:
    """Why the granularity does not fit a ``[K, N]`` weight (None when it does).

    ``partial_block``: a block up to twice K is one partial block (MatMul/Gemm weights; what
    ONNX Runtime's quantizer writes for K < block, padding K to the block)."""
    block = config.granularity.k_block
    if partial_block and block is not None and k < block < 2 * k:
        return None
    return config.granularity.misfit(k, n)


def _requested(config: QuantConfig, written: str, rejection: str | None) -> FormatChoice:
    """The format the user asked for, or an error saying why it cannot hold the config."""
    if rejection:
        raise OxQuantError(f"--format {config.format.value} cannot express {config.describe()}: {rejection}")
    return FormatChoice(written, "requested")


def choose_format(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> FormatChoice:
    """Resolve ``config.format`` (``auto`` included) for a MatMul weight ``[K, N]``.

    Raises ``OxQuantError`` with every format's reason when none can express it.
    The caller checks :func:`check_granularity_fits` first.
    """
    nbits_no = matmulnbits_rejects(config, k, n, dtype)
    qdq_no = qdq_rejects(config, k, n, dtype)
    custom_no = custom_rejects(config, k, n, dtype)
    if config.format is Format.MATMULNBITS:
        return _requested(config, "matmulnbits", nbits_no)
    if config.format is Format.QDQ:
        return _requested(config, "qdq", qdq_no)
    if config.format is Format.CUSTOM:
        return _requested(config, "custom", custom_no)
    if nbits_no is None:
        return FormatChoice("matmulnbits", "ONNX Runtime's MatMulNBits kernel accepts this config")
    if qdq_no is None:
        return FormatChoice("qdq", nbits_no)
    if custom_no is None:
        return FormatChoice("custom", f"{nbits_no}; {qdq_no}: ox-quant's custom op (needs its library at run time)")
    raise OxQuantError(f"no format can express {config.describe()}: {nbits_no}; {qdq_no}; {custom_no}")


def choose_gather_format(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> FormatChoice:
    """Format for an embedding table read only by Gather (``[V, D]``, blocks along D)."""
    gbq_no = gather_rejects(config, k, n, dtype)
    qdq_no = qdq_rejects(config, k, n, dtype)
    if config.format is Format.QDQ:
        return _requested(config, "qdq", qdq_no)
    if config.format is Format.CUSTOM:
        raise OxQuantError("--format custom has no Gather op (ox-quant's custom op is a MatMul)")
    if gbq_no is None:
        return FormatChoice("gather_block_quantized", "ONNX Runtime's GatherBlockQuantized accepts this config")
    if config.format is Format.MATMULNBITS:
        raise OxQuantError(f"GatherBlockQuantized cannot express {config.describe()}: {gbq_no}")
    if qdq_no is None:
        return FormatChoice("qdq", gbq_no)
    raise OxQuantError(f"no format can express {config.describe()} for an embedding: {gbq_no}; {qdq_no}")


def choose_qdq_only(config: QuantConfig, why: str) -> FormatChoice:
    """QDQ, the one format that can serve every use (tied weights, Conv, general Gemm)."""
    qdq_no = qdq_rejects(config, 0, 0)
    if qdq_no:
        raise OxQuantError(f"{why}, and {qdq_no}")
    return FormatChoice("qdq", why)


def granularity_block_size(config: QuantConfig) -> int | None:
    """The ``block_size`` reported for a granularity: B, G, -1 (per-channel) or None."""
    return config.granularity.block_size
