"""Quantization configuration: granularity as types, and one frozen config per weight.

Every weight is normalised to ``W: [K, N]`` (K = reduction axis, N = output channels)
before any of these are applied. Granularities say how scales are shared:

===================  =============================  ======================
granularity          scale (and zero point) shape   shared by
===================  =============================  ======================
``PerTensor()``      ``[1, 1]``                     all K*N weights
``PerChannel()``     ``[1, N]``                     one output channel
``Block(B)``         ``[ceil(K/B), N]``             B consecutive k of one n
``ChannelGroup(G)``  ``[1, ceil(N/G)]``             G consecutive n, all k
===================  =============================  ======================
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar

from ox_quant.errors import OxQuantError

MIN_BITS = 2
MAX_BITS = 8
DEFAULT_BLOCK_SIZE = 128
"""Block size along K when none is given (CLI, recipes, the default config)."""
PER_CHANNEL_BLOCK_SIZE = -1
"""A block size of -1 means per-channel (the GPTQ convention); also how it is reported."""
DEFAULT_ALGORITHM = "rtn"
"""Round-to-nearest: the algorithm used when none is named (``ox_quant.algorithms.registry``)."""


class Granularity:
    """How scales are shared over ``W[K, N]``: one scale per block of ``block_shape(K, N)``
    weights (the last block along each axis may be partial)."""

    name: ClassVar[str] = ""
    per_tensor: ClassVar[bool] = False
    per_channel: ClassVar[bool] = False

    def block_shape(self, k: int, n: int) -> tuple[int, int]:
        """``(rows, cols)`` of weights sharing one scale."""
        raise NotImplementedError

    def scale_shape(self, k: int, n: int) -> tuple[int, int]:
        """Shape of the scales (and zero points): ``ceil([K, N] / block_shape)``."""
        rows, cols = self.block_shape(k, n)
        return (math.ceil(k / rows), math.ceil(n / cols))

    @property
    def k_block(self) -> int | None:
        """Block size along K when K is split into blocks (``block:B``), else None."""
        return None

    @property
    def n_group(self) -> int | None:
        """Output channels per scale when channels are grouped (``channel-group:G``), else None."""
        return None

    @property
    def block_size(self) -> int | None:
        """The ``block_size`` reported: B, G, -1 (per-channel) or None (per-tensor)."""
        return None

    def misfit(self, k: int, n: int) -> str | None:
        """Why this granularity does not fit a ``[K, N]`` weight (None when it does)."""
        return None


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole weight."""

    name = "tensor"
    per_tensor = True

    def block_shape(self, k: int, n: int) -> tuple[int, int]:
        return k, n

    def scale_shape(self, k: int, n: int) -> tuple[int, int]:
        return (1, 1)

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output channel (N scales)."""

    name = "channel"
    per_channel = True

    def block_shape(self, k: int, n: int) -> tuple[int, int]:
        return k, 1

    @property
    def block_size(self) -> int | None:
        return PER_CHANNEL_BLOCK_SIZE

    def scale_shape(self, k: int, n: int) -> tuple[int, int]:
        return (1, n)

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class Block(Granularity):
    """One scale per output channel per ``size`` consecutive elements along K."""

    size: int
    name = "block"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise OxQuantError(f"block size must be a positive integer, got {self.size}")

    def block_shape(self, k: int, n: int) -> tuple[int, int]:
        return self.size, 1

    @property
    def k_block(self) -> int | None:
        return self.size

    @property
    def block_size(self) -> int | None:
        return self.size

    def misfit(self, k: int, n: int) -> str | None:
        return f"block size {self.size} is larger than K={k}" if self.size > k else None

    def scale_shape(self, k: int, n: int) -> tuple[int, int]:
        return (math.ceil(k / self.size), n)

    def __str__(self) -> str:
        return f"block:{self.size}"


@dataclass(frozen=True)
class ChannelGroup(Granularity):
    """One scale per ``size`` consecutive output channels, across all of K."""

    size: int
    name = "channel-group"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise OxQuantError(f"channel-group size must be a positive integer, got {self.size}")

    def block_shape(self, k: int, n: int) -> tuple[int, int]:
        return k, self.size

    @property
    def n_group(self) -> int | None:
        return self.size

    @property
    def block_size(self) -> int | None:
        return self.size

    def misfit(self, k: int, n: int) -> str | None:
        return f"channel-group size {self.size} is larger than N={n}" if self.size > n else None

    def scale_shape(self, k: int, n: int) -> tuple[int, int]:
        return (1, math.ceil(n / self.size))

    def __str__(self) -> str:
        return f"channel-group:{self.size}"


def parse_granularity(text: str, block_size: int | None = None) -> Granularity:
    """Parse ``tensor``, ``channel``, ``block[:B]`` or ``channel-group[:G]``.

    A size after the colon wins over ``block_size``. ``block`` with size -1 is
    per-channel (the GPTQ convention).
    """
    kind, _, size_text = text.strip().partition(":")
    size = block_size
    if size_text:
        try:
            size = int(size_text)
        except ValueError:
            raise OxQuantError(f"granularity {text!r}: size {size_text!r} is not an integer") from None
    if kind == "tensor":
        return PerTensor()
    if kind == "channel":
        return PerChannel()
    if kind in ("block", "group"):
        if size is None:
            raise OxQuantError(f"granularity {text!r} needs a block size (block:B or --block-size B)")
        return PerChannel() if size == PER_CHANNEL_BLOCK_SIZE else Block(size)
    if kind == "channel-group":
        if size is None or size < 1:
            raise OxQuantError(f"granularity {text!r} needs a positive group size (channel-group:G or --block-size G)")
        return ChannelGroup(size)
    raise OxQuantError(
        f"unknown granularity {text!r}: use tensor, channel, block[:B] or channel-group[:G]"
    )


def resolve_granularity(
    granularity: str | None,
    block_size: int | None,
    default_size: int = DEFAULT_BLOCK_SIZE,
    option: str = "--block-size",
) -> Granularity:
    """Combine a granularity text and a block size (the CLI's ``--granularity`` and
    ``--block-size``, a recipe rule's ``granularity`` and ``block_size``).

    The block size alone means block B (-1: per-channel); neither means block
    ``default_size``; ``block`` or ``channel-group`` without a size take ``block_size``,
    else ``default_size``. ``option`` names the block size in the error message.
    """
    if granularity is None:
        if block_size == PER_CHANNEL_BLOCK_SIZE:
            return PerChannel()
        return parse_granularity("block", block_size if block_size is not None else default_size)
    kind = granularity.split(":", 1)[0]
    if kind in ("tensor", "channel") and block_size is not None and block_size != PER_CHANNEL_BLOCK_SIZE:
        raise OxQuantError(f"{option} applies to block and channel-group granularity, not {kind}")
    if kind in ("block", "channel-group") and ":" not in granularity and block_size is None:
        block_size = default_size
    return parse_granularity(granularity, block_size)


class Format(str, enum.Enum):
    """How a quantized weight is written into the graph."""

    AUTO = "auto"
    MATMULNBITS = "matmulnbits"
    QDQ = "qdq"
    CUSTOM = "custom"

    def __str__(self) -> str:
        return self.value


class SymmetricRule(str, enum.Enum):
    """How a symmetric group's scale is chosen (zero point ``2**(bits-1)``; see
    :mod:`ox_quant.core.symmetric`): the lowest squared error of a few scales that keep the
    largest weight (default), the same plus clipped scales, ONNX Runtime's signed
    full-range scale, or the balanced ``absmax / (2**(bits-1) - 1)``."""

    MIN_ERROR = "min-error"
    MIN_ERROR_CLIP = "min-error-clip"
    SIGNED = "signed"
    ABSMAX = "absmax"

    def __str__(self) -> str:
        return self.value


DEFAULT_SYMMETRIC = False
"""Asymmetric by default (a zero point per group): ONNX Runtime's ``MatMulNBitsQuantizer`` default,
the same codes; the symmetric rules fall below it on some models (docs/defaults.md)."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one weight.

    ``symmetric``: zero point fixed at ``2**(bits-1)`` (the middle of the unsigned range),
    scale chosen per group by ``symmetric_rule`` (unused when asymmetric). Asymmetric: scale and zero point cover
    ``[min(w_min, 0), max(w_max, 0)]`` of each group (zero stays exactly representable).
    ``accuracy_level`` is passed through to MatMulNBits (None: not written).
    ``algorithm`` names the quantizer that chooses scales and codes (``ox_quant.algorithms``;
    checked against its registry when a conversion is planned).
    """

    bits: int = 4
    granularity: Granularity = Block(DEFAULT_BLOCK_SIZE)
    symmetric: bool = DEFAULT_SYMMETRIC
    format: Format = Format.AUTO
    accuracy_level: int | None = None
    algorithm: str = DEFAULT_ALGORITHM
    symmetric_rule: SymmetricRule = SymmetricRule.MIN_ERROR

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise OxQuantError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OxQuantError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if not isinstance(self.symmetric_rule, SymmetricRule):
            try:
                object.__setattr__(self, "symmetric_rule", SymmetricRule(str(self.symmetric_rule)))
            except ValueError:
                choices = ", ".join(r.value for r in SymmetricRule)
                raise OxQuantError(f"symmetric rule must be one of {choices}, got {self.symmetric_rule!r}") from None

    @property
    def qmax(self) -> int:
        """Largest unsigned integer code: ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """Symmetric zero point: ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    def describe(self) -> str:
        kind = "asym" if not self.symmetric else "sym" if self.symmetric_rule is SymmetricRule.MIN_ERROR else f"sym-{self.symmetric_rule}"
        return f"int{self.bits} {self.granularity} {kind}"
