"""Which weights are quantized, and with which config: filters and recipe files.

A recipe (JSON or YAML) maps name patterns to per-weight configs, for mixed precision::

    rules:
      - match: "embed|lm_head"      # regex, searched in the weight name and its node names
        bits: 8
        granularity: channel
      - match: "layers\\.0\\."
        op: MatMul                  # optional: only weights of this consumer op
        skip: true
      - match: "."
        bits: 4
        block_size: 64
        format: qdq
        symmetric: false            # or symmetric_rule: min-error | signed | absmax
        algorithm: rtn              # the quantizer (ox_quant.algorithms.registry)
        activations: false          # with --activations: leave this weight's input float
      - position: last              # the last weight in graph order (``first`` too); with a
        activations: false          # ``match``, the first/last of the weights it matches

The first rule that matches a weight wins; its fields override the command-line config.
A weight no rule matches keeps the command-line config. ``position`` counts the weights the
selection keeps (``--include``/``--exclude``/``--min-elements``, the rule's ``op``) in the order
their first (``first``) or last (``last``) reading node comes in the graph: ``first`` is the
model's first layer, ``last`` its last (a tied embedding's last reader is the output
projection).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ox_quant.algorithms.registry import get_quantizer
from ox_quant.core.config import DEFAULT_BLOCK_SIZE, Format, QuantConfig, SymmetricRule, resolve_granularity
from ox_quant.errors import OxQuantError
from ox_quant.ir.sites import QUANTIZABLE_OPS, WeightSite, name_matches

RULE_KEYS = {"match", "position", "op", "skip", "bits", "block_size", "granularity", "format", "symmetric", "symmetric_rule",
             "accuracy_level", "algorithm", "activations"}


POSITIONS = ("first", "last")


@dataclass(frozen=True)
class Rule:
    """``pattern`` (and ``op``) select weights; ``position`` keeps the first or last of them in
    graph order, and ``resolve_positions`` turns it into ``names``, the weights it matches."""

    pattern: re.Pattern[str]
    op: str | None
    skip: bool
    overrides: dict[str, Any]
    position: str | None = None
    names: frozenset[str] | None = None


@dataclass(frozen=True)
class Selection:
    """Filters applied to every weight site.

    include/exclude: regexes searched in weight and node names (exclude wins);
    include_ops: consumer op types considered; min_elements: smaller weights are skipped.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_ops: tuple[str, ...] = QUANTIZABLE_OPS
    min_elements: int = 0
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def compiled(self) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
        return [_compile(p, "--include") for p in self.include], [_compile(p, "--exclude") for p in self.exclude]


def _compile(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OxQuantError(f"{option} {pattern!r} is not a valid regular expression: {exc}") from None


def resolve_ops(include_ops: tuple[str, ...], exclude_ops: tuple[str, ...]) -> tuple[str, ...]:
    """Op types to quantize from ``--include-op``/``--exclude-op`` (case-insensitive)."""
    canonical = {op.lower(): op for op in QUANTIZABLE_OPS}
    for op in (*include_ops, *exclude_ops):
        if op.lower() not in canonical:
            raise OxQuantError(f"unknown op type {op!r}: choose from {', '.join(QUANTIZABLE_OPS)}")
    chosen = [canonical[o.lower()] for o in include_ops] if include_ops else list(QUANTIZABLE_OPS)
    excluded = {canonical[o.lower()] for o in exclude_ops}
    return tuple(op for op in chosen if op not in excluded)


def load_recipe(path: str | Path) -> tuple[Rule, ...]:
    """Parse a recipe file (``.json``, ``.yaml`` or ``.yml``) into rules."""
    path = Path(path)
    if not path.is_file():
        raise OxQuantError(f"recipe {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        try:
            import yaml
        except ImportError:
            raise OxQuantError(
                f"recipe {path.name}: reading YAML needs PyYAML: run pip install pyyaml (or write the recipe as .json)"
            ) from None
    try:
        if is_yaml:
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OxQuantError(f"recipe {path.name} is not valid {path.suffix.lstrip('.') or 'JSON'}: {first}") from None
    raw_rules = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(raw_rules, list):
        raise OxQuantError(f"recipe {path.name}: expected a list of rules (or {{'rules': [...]}})")
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"recipe {path.name}, rule {i + 1}"
        if not isinstance(raw, dict) or not ("match" in raw or "position" in raw):
            raise OxQuantError(f"{where}: each rule is a mapping with a 'match' regex or a 'position'")
        unknown = set(raw) - RULE_KEYS
        if unknown:
            raise OxQuantError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(RULE_KEYS))})")
        op = raw.get("op")
        if op is not None and op not in QUANTIZABLE_OPS:
            raise OxQuantError(f"{where}: op must be one of {', '.join(QUANTIZABLE_OPS)}")
        position = raw.get("position")
        if position is not None and position not in POSITIONS:
            raise OxQuantError(f"{where}: position must be one of {', '.join(POSITIONS)}, got {position!r}")
        overrides = {k: v for k, v in raw.items() if k not in ("match", "position", "op", "skip")}
        rules.append(Rule(_compile(str(raw.get("match", ".")), where), op, bool(raw.get("skip", False)), overrides,
                          position))
    return tuple(rules)


def resolve_positions(rules: tuple[Rule, ...], sites: list[WeightSite], graph_order: dict[int, int]) -> tuple[Rule, ...]:
    """``rules`` with each ``position`` rule bound to the one weight it names among ``sites``
    (those the selection keeps): of the sites its pattern and op match, the one whose first
    (``first``) or last (``last``) reading node comes first or last in ``graph_order``
    (``id(node) -> index``). No such site: the rule matches nothing."""
    resolved = []
    for rule in rules:
        if rule.position is None:
            resolved.append(rule)
            continue
        matching = [s for s in sites if _rule_matches(rule, s)]
        names: frozenset[str] = frozenset()
        if matching:
            if rule.position == "first":
                site = min(matching, key=lambda s: min(graph_order.get(id(u.node), 0) for u in s.uses))
            else:
                site = max(matching, key=lambda s: max(graph_order.get(id(u.node), 0) for u in s.uses))
            names = frozenset([site.name])
        resolved.append(replace(rule, position=None, names=names))
    return tuple(resolved)


def graph_order(sites: list[WeightSite]) -> dict[int, int]:
    """``id(node) -> index`` of every node of the graphs holding ``sites``, in graph order."""
    order: dict[int, int] = {}
    for graph in {id(s.graph): s.graph for s in sites}.values():
        for node in graph:
            order.setdefault(id(node), len(order))
    return order


def _rule_matches(rule: Rule, site: WeightSite) -> bool:
    if rule.op is not None and rule.op not in site.op.split("+"):
        return False
    if rule.names is not None:
        return site.name in rule.names
    return name_matches([rule.pattern], site) is not None


def apply_overrides(base: QuantConfig, overrides: dict[str, Any], where: str = "recipe") -> QuantConfig:
    """``base`` with a rule's fields applied (validated like the command line)."""
    if not overrides:
        return base
    try:
        changes: dict[str, Any] = {}
        if "bits" in overrides:
            changes["bits"] = int(overrides["bits"])
        if "symmetric" in overrides:
            changes["symmetric"] = bool(overrides["symmetric"])
        if "symmetric_rule" in overrides:
            choices = [r.value for r in SymmetricRule]
            if str(overrides["symmetric_rule"]) not in choices:
                raise OxQuantError(f"{where}: symmetric_rule must be one of {', '.join(choices)}, "
                                   f"got {overrides['symmetric_rule']!r}")
            changes["symmetric_rule"] = SymmetricRule(str(overrides["symmetric_rule"]))
        if "accuracy_level" in overrides:
            changes["accuracy_level"] = None if overrides["accuracy_level"] is None else int(overrides["accuracy_level"])
        if "format" in overrides:
            changes["format"] = Format(str(overrides["format"]))
        if "algorithm" in overrides:
            try:
                changes["algorithm"] = get_quantizer(str(overrides["algorithm"])).name
            except OxQuantError as exc:
                raise OxQuantError(f"{where}: {exc}") from None
        if "granularity" in overrides or "block_size" in overrides:
            block = overrides.get("block_size")
            text = overrides.get("granularity")
            size = base.granularity.block_size
            default = size if size is not None and size > 0 else DEFAULT_BLOCK_SIZE
            changes["granularity"] = resolve_granularity(
                None if text is None else str(text), None if block is None else int(block), default, "block_size"
            )
    except (ValueError, TypeError) as exc:
        raise OxQuantError(f"{where}: {exc}") from None
    return replace(base, **changes)


def first_matching_rule(site: WeightSite, rules: tuple[Rule, ...]) -> tuple[int, Rule] | None:
    """``(index, rule)`` of the first recipe rule whose op and pattern match ``site`` (first match wins)."""
    for i, rule in enumerate(rules):
        if rule.position is not None:
            raise ValueError("resolve_positions first: a position rule names no weight yet")
        if _rule_matches(rule, site):
            return i, rule
    return None