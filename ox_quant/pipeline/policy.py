"""The default policy: which config each kind of weight gets, and why.

``--bits``, ``--block-size``/``--granularity`` and ``--symmetric`` set the config of
MatMul weights. Gemm and Conv weights and embedding tables (read by a Gather, tables tied
to the output MatMul included) stay float unless asked for, as ONNX Runtime's quantizer
leaves them: measured (docs/defaults.md), 4 bits break Conv and tables, int8 still costs
accuracy on some models (PP-OCR's detector), and a quantized Gemm head costs CREPE pitch
accuracy that ONNX Runtime's output keeps, so they are opt-in:

=========================================  ===========================  ===================
weight (its role)                          default                      flag
=========================================  ===========================  ===================
MatMul (``matmul``)                        ``--bits`` ``--block-size``  --
Gemm (``gemm``)                            float                        ``--gemm-bits B``
Conv (``conv``)                            float                        ``--conv-bits B``
Gather table, tied table (``embedding``)   float                        ``--embedding-bits B``
=========================================  ===========================  ===================

Gemm weights take the MatMul config at their width; Conv weights are quantized per output channel; tables in blocks of ``--block-size``
along the embedding dim (narrower tables: the widest power of two from 16 that fits).
A recipe rule that matches a weight applies on top of its role's config (a rule with
``bits: 8`` quantizes a Conv the policy leaves float). A weight whose bits no format can
hold for its op is written at the next width one can hold (3 -> 4, 5..7 -> 8) instead of
staying float, when the format is ``auto``: a 3-bit request never writes a larger file than
a 4-bit one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from ox_quant.core.config import Block, Format, PerChannel, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.formats.choice import FormatChoice
from ox_quant.ir.sites import Skip, WeightSite
from ox_quant.pipeline.selection import Rule, apply_overrides, first_matching_rule

Role = Literal["matmul", "gemm", "conv", "embedding"]

FLOAT = "float"
"""A role's width meaning: leave these weights float."""
SAME = "bits"
"""A role's width meaning: follow ``--bits`` (and the command-line granularity for tables)."""
DEFAULT_CONV_BITS: Width = FLOAT
DEFAULT_GEMM_BITS: Width = FLOAT
DEFAULT_EMBEDDING_BITS: Width = FLOAT
DEFAULT_EMBEDDING_BLOCK = 128
#: Widths some standard format holds for every op (DequantizeLinear: 4 and 8).
STANDARD_BITS = (4, 8)
POLICY_SKIP = "left float by the default policy"

Width = int | str
Planner = Callable[[WeightSite, QuantConfig], "tuple[QuantConfig, FormatChoice] | Skip"]


def parse_width(text: str, flag: str) -> Width:
    """``--conv-bits``/``--gemm-bits``/``--embedding-bits`` value: ``float``, ``bits`` or an integer 2..8."""
    value = text.strip().lower()
    if value in (FLOAT, SAME):
        return value
    try:
        bits = int(value)
    except ValueError:
        raise OxQuantError(f"{flag} {text!r}: expected float, bits, or 2 to 8") from None
    try:
        QuantConfig(bits=bits)
    except OxQuantError as exc:
        raise OxQuantError(f"{flag}: {exc}") from None
    return bits


@dataclass(frozen=True)
class Policy:
    """Widths of the weights that do not simply follow ``--bits``.

    ``conv_bits`` / ``gemm_bits`` / ``embedding_bits``: an integer, ``FLOAT`` (leave them) or
    ``SAME`` (follow ``--bits``). ``explicit``: roles the user set (only changes the reason shown).
    """

    conv_bits: Width = DEFAULT_CONV_BITS
    embedding_bits: Width = DEFAULT_EMBEDDING_BITS
    gemm_bits: Width = DEFAULT_GEMM_BITS
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for flag, width in (("--conv-bits", self.conv_bits), ("--embedding-bits", self.embedding_bits),
                            ("--gemm-bits", self.gemm_bits)):
            parse_width(str(width), flag)

    def describe(self, base: QuantConfig) -> str:
        """One line: the config of each role, e.g. for the summary."""
        kind = "sym" if base.symmetric else "asym"

        def width(w: Width) -> str:
            return "float" if w == FLOAT else f"int{base.bits if w == SAME else w}"

        conv = width(self.conv_bits) + ("" if self.conv_bits == FLOAT else " per output channel")
        emb = width(self.embedding_bits) + ("" if self.embedding_bits == FLOAT else f" {embedding_granularity(base)}")
        return (f"MatMul at int{base.bits} {base.granularity} {kind}; Gemm {width(self.gemm_bits)} (--gemm-bits); "
                f"Conv {conv} (--conv-bits); embeddings (Gather, tied tables) {emb} (--embedding-bits)")


UNIFORM = Policy(conv_bits=SAME, embedding_bits=SAME, gemm_bits=SAME)
"""Every weight at the command-line config (what the granularity studies use)."""


def role_of(site: WeightSite) -> Role:
    """``conv`` (Conv weights), ``embedding`` (read by a Gather, tied tables included), ``gemm``
    (read by Gemm nodes only), else ``matmul``."""
    kinds = site.kinds
    if "conv" in kinds:
        return "conv"
    if "gather" in kinds:
        return "embedding"
    if kinds == {"gemm"}:
        return "gemm"
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


def _role_width(role: Role, policy: Policy) -> Width:
    return {"conv": policy.conv_bits, "embedding": policy.embedding_bits, "gemm": policy.gemm_bits}.get(role, SAME)


def role_config(site: WeightSite, base: QuantConfig, policy: Policy) -> tuple[QuantConfig, str] | Skip:
    """The config the policy gives ``site`` before any recipe rule, and why; a Skip when it stays float."""
    role = role_of(site)
    width = _role_width(role, policy)
    flag = {"conv": "--conv-bits", "embedding": "--embedding-bits", "gemm": "--gemm-bits"}.get(role, "--bits")
    if width == FLOAT:
        what = {"conv": "Conv weights", "gemm": "Gemm weight"}.get(role, "embedding table")
        hint = "bits" if role == "gemm" else "8"
        return Skip(site.name, f"{what} {POLICY_SKIP} ({flag} {hint} quantizes it)")
    if width == SAME:
        return base, "--bits"
    why = flag if role in policy.explicit else f"default policy ({flag})"
    if role == "conv":
        return replace(base, bits=int(width), granularity=PerChannel()), why
    if role == "gemm":
        return replace(base, bits=int(width)), why
    return replace(base, bits=int(width), granularity=embedding_granularity(base, site.k)), why


def config_for_site(
    site: WeightSite, base: QuantConfig, rules: tuple[Rule, ...], policy: Policy
) -> tuple[QuantConfig, str] | Skip | None:
    """The config of ``site`` and why: the first matching recipe rule on top of the policy's
    config (of ``--bits`` where the policy leaves the role float); a Skip when the policy
    leaves it float and no rule matches; None when a rule says skip."""
    chosen = role_config(site, base, policy)
    matched = first_matching_rule(site, rules)
    if matched is None:
        return chosen
    i, rule = matched
    if rule.skip:
        return None
    config = chosen[0] if not isinstance(chosen, Skip) else role_config(site, base, UNIFORM)[0]  # type: ignore[index]
    return apply_overrides(config, rule.overrides, f"recipe rule {i + 1}"), f"recipe rule {i + 1}"


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
