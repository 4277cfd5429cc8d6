"""The default policy: which config each kind of weight gets, and why.

``--bits``, ``--block-size``/``--granularity`` and ``--symmetric`` set the config of
MatMul and Gemm weights. Two kinds of weight get their own bit width, because 4 bits
measurably break them (docs/defaults.md):

=====================================  ===========================  ======================
weight (its role)                      default                      flag
=====================================  ===========================  ======================
MatMul, Gemm (``matmul``)              ``--bits`` ``--block-size``  --
Conv (``conv``)                        int8 per output channel      ``--conv-bits``
Gather table, tied table (``embedding``)  int8, blocks of ``--block-size``  ``--embedding-bits``
                                       (narrower tables: the widest block that fits)
=====================================  ===========================  ======================

A recipe rule that matches a weight applies on top of its role's config (so a rule with
``bits: 4`` makes a Conv 4-bit). A weight whose bits no format can hold for its op is
written at the next width one can hold (3 -> 4, 5..7 -> 8) instead of staying float, when
the format is ``auto``: a 3-bit request never writes a larger file than a 4-bit one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

from ox_quant.config import Block, Format, PerChannel, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats import FormatChoice
from ox_quant.selection import Rule, apply_overrides
from ox_quant.sites import Skip, WeightSite, name_matches

Role = Literal["matmul", "conv", "embedding"]

DEFAULT_CONV_BITS = 8
DEFAULT_EMBEDDING_BITS = 8
DEFAULT_EMBEDDING_BLOCK = 128
#: Widths some standard format holds for every op (DequantizeLinear: 4 and 8).
STANDARD_BITS = (4, 8)

Planner = Callable[[WeightSite, QuantConfig], "tuple[QuantConfig, FormatChoice] | Skip"]


@dataclass(frozen=True)
class Policy:
    """Bit widths of the weights that do not follow ``--bits``.

    ``conv_bits`` / ``embedding_bits``: None = follow the command-line config (uniform).
    ``explicit``: which of the two the user set (only changes the reason shown).
    """

    conv_bits: int | None = DEFAULT_CONV_BITS
    embedding_bits: int | None = DEFAULT_EMBEDDING_BITS
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for flag, bits in (("--conv-bits", self.conv_bits), ("--embedding-bits", self.embedding_bits)):
            if bits is not None:
                try:
                    QuantConfig(bits=bits)
                except OxQuantError as exc:
                    raise OxQuantError(f"{flag}: {exc}") from None

    def describe(self, base: QuantConfig) -> str:
        """One line: the config of each role, e.g. for the summary and ``--help``."""
        kind = "sym" if base.symmetric else "asym"
        parts = [f"MatMul/Gemm at int{base.bits} {base.granularity} {kind}"]
        parts.append("Conv at " + (f"int{self.conv_bits} per output channel" if self.conv_bits else "--bits per output channel"))
        emb_block = embedding_granularity(base)
        parts.append("embeddings (Gather, tied tables) at "
                     + (f"int{self.embedding_bits} {emb_block}" if self.embedding_bits else f"--bits {emb_block}"))
        return "; ".join(parts)


UNIFORM = Policy(conv_bits=None, embedding_bits=None)
"""Every weight at the command-line config (what the granularity studies use)."""


def role_of(site: WeightSite) -> Role:
    """``conv`` (Conv weights), ``embedding`` (read by a Gather, tied tables included), else ``matmul``."""
    kinds = site.kinds
    if "conv" in kinds:
        return "conv"
    if "gather" in kinds:
        return "embedding"
    return "matmul"


def embedding_granularity(base: QuantConfig, width: int | None = None) -> Block | PerChannel:
    """Blocks along the embedding dim ``width`` (D): ``--block-size``'s, else 128; for a table
    narrower than that, the widest power of two from 16 that fits (GatherBlockQuantized's
    sizes), and one scale per row below 16."""
    size = base.granularity.size if isinstance(base.granularity, Block) else DEFAULT_EMBEDDING_BLOCK
    if width is None or size <= width:
        return Block(size)
    if width < 16:
        return PerChannel()
    return Block(1 << (width.bit_length() - 1))


def role_config(site: WeightSite, base: QuantConfig, policy: Policy) -> tuple[QuantConfig, str]:
    """The config the policy gives ``site`` before any recipe rule, and why (one phrase)."""
    role = role_of(site)
    if role == "conv" and policy.conv_bits is not None:
        why = "--conv-bits" if "conv" in policy.explicit else "default policy: Conv at int8 per output channel (--conv-bits)"
        return replace(base, bits=policy.conv_bits, granularity=PerChannel()), why
    if role == "embedding" and policy.embedding_bits is not None:
        why = ("--embedding-bits" if "embedding" in policy.explicit
               else "default policy: embeddings at int8 (--embedding-bits)")
        return replace(base, bits=policy.embedding_bits, granularity=embedding_granularity(base, site.k)), why
    return base, "--bits"


def config_for_site(
    site: WeightSite, base: QuantConfig, rules: tuple[Rule, ...], policy: Policy
) -> tuple[QuantConfig, str] | None:
    """The config of ``site`` (policy, then the first matching recipe rule) and why; None: skipped by a rule."""
    config, why = role_config(site, base, policy)
    for i, rule in enumerate(rules):
        if rule.op is not None and rule.op not in site.op.split("+"):
            continue
        if name_matches([rule.pattern], site) is None:
            continue
        if rule.skip:
            return None
        return apply_overrides(config, rule.overrides, f"recipe rule {i + 1}"), f"recipe rule {i + 1}"
    return config, why


def plan_with_fallback(
    site: WeightSite, config: QuantConfig, planner: Planner
) -> tuple[QuantConfig, FormatChoice, str | None] | Skip:
    """``planner(site, config)``; when it cannot hold ``config.bits`` (skip or error) and the
    format is ``auto``, the first wider standard width that it can (4, then 8).

    Returns the config, the format, and a note when the bits were raised (None otherwise).
    Raises the planner's ``OxQuantError`` when no width works.
    """
    error: OxQuantError | None = None
    try:
        planned = planner(site, config)
    except OxQuantError as exc:
        planned, error = Skip(site.name, str(exc)), exc
    if not isinstance(planned, Skip):
        return planned[0], planned[1], None
    if config.format is Format.AUTO:
        for bits in STANDARD_BITS:
            if bits <= config.bits:
                continue
            try:
                wider = planner(site, replace(config, bits=bits))
            except OxQuantError:
                continue
            if not isinstance(wider, Skip):
                note = f"int{config.bits} raised to int{bits} ({planned.reason}), not left float"
                return wider[0], wider[1], note
    if error is not None:
        raise error
    return planned
