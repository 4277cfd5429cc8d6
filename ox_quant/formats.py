"""Which on-disk format can express a quantization config, and why not.

The one place that maps granularities to each format's axis and block conventions:

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

from ox_quant.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig
from ox_quant.errors import OxQuantError

MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
QDQ_BITS = (4, 8)
FLOAT_DTYPES = ("FLOAT", "FLOAT16")  # activation dtypes MatMulNBits accepts on CPU


WRITTEN_FORMATS = ("matmulnbits", "qdq", "gather_block_quantized", "custom")


@dataclass(frozen=True)
class FormatChoice:
    """The format a weight is written in (one of ``WRITTEN_FORMATS``) and why."""

    format: str
    reason: str


def _ms_block_op_rejects(op: str, config: QuantConfig, dtype: str, along: str) -> str | None:
    """The limits ONNX Runtime's CPU kernels of MatMulNBits and GatherBlockQuantized share."""
    if config.bits not in MATMULNBITS_BITS:
        return f"{op} takes {'/'.join(map(str, MATMULNBITS_BITS))} bits, not {config.bits}"
    if not isinstance(config.granularity, Block):
        return f"{op} needs block scales along {along}, not {config.granularity.name} scales"
    if config.granularity.size not in MATMULNBITS_BLOCK_SIZES:
        return f"{op} block size must be a power of two from 16 to 256, not {config.granularity.size}"
    if dtype not in FLOAT_DTYPES:
        return f"{op} takes float32/float16 weights, not {dtype.lower()}"
    return None


def matmulnbits_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why MatMulNBits cannot hold this config (None when it can)."""
    return _ms_block_op_rejects("MatMulNBits", config, dtype, "K")


def qdq_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why DequantizeLinear cannot hold this config (None when it can)."""
    if config.bits not in QDQ_BITS:
        return f"DequantizeLinear takes 4- or 8-bit integers, not {config.bits}-bit"
    return None


def check_granularity_fits(config: QuantConfig, k: int, n: int, partial_block: bool = False) -> str | None:
    """Why the granularity does not fit a ``[K, N]`` weight (None when it does).

    ``partial_block``: a block up to twice K is one partial block (MatMul/Gemm weights; what
    ONNX Runtime's quantizer writes for K < block, padding K to the block)."""
    g = config.granularity
    if isinstance(g, Block) and g.size > k and not (partial_block and g.size < 2 * k):
        return f"block size {g.size} is larger than K={k}"
    if isinstance(g, ChannelGroup) and g.size > n:
        return f"channel-group size {g.size} is larger than N={n}"
    return None


def custom_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why ox-quant's own ``ox_quant.MatMulNBits`` cannot hold this config (None when it can).

    It takes any bits 2..8 and every granularity: block B, per-channel (one block of K),
    channel-group G (one block of K, G channels per scale), per-tensor (K and N).
    """
    if dtype not in FLOAT_DTYPES:
        return f"ox_quant.MatMulNBits takes float32/float16 activations, not {dtype.lower()}"
    return None


def custom_block_and_group(config: QuantConfig, k: int, n: int) -> tuple[int, int]:
    """``(block_size, channel_group_size)`` of ``ox_quant.MatMulNBits`` for a granularity."""
    g = config.granularity
    if isinstance(g, Block):
        return g.size, 1
    if isinstance(g, PerChannel):
        return k, 1
    if isinstance(g, ChannelGroup):
        return k, g.size
    if isinstance(g, PerTensor):
        return k, n
    raise TypeError(g)


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


def gather_rejects(config: QuantConfig, k: int, n: int, dtype: str = "FLOAT") -> str | None:
    """Why ``com.microsoft.GatherBlockQuantized`` cannot hold a table ``[V=N, D=K]``."""
    rejected = _ms_block_op_rejects("GatherBlockQuantized", config, dtype, "the embedding")
    if rejected is None and (k * config.bits) % 8:
        return f"embedding width {k} x {config.bits} bits is not a whole number of bytes"
    return rejected


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
    g = config.granularity
    if isinstance(g, (Block, ChannelGroup)):
        return g.size
    if isinstance(g, PerChannel):
        return -1
    if isinstance(g, PerTensor):
        return None
    raise TypeError(g)
