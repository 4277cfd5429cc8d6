"""Which input axes of an export are dynamic, and the second shapes that test them.

``infer_axes`` guesses from the example inputs' names and shapes (every guess carries its
reason); ``declared_axes`` takes the user's ``INPUT:AXIS=NAME`` list instead. Either way
``AxisPlan`` then gives each dynamic symbol a second size (``second_sizes``) and builds
inputs at those sizes (``inputs_at``), so the export can be run there on PyTorch and ONNX
Runtime (``ox_quant.export.check``).

Default rules, for an input named N of shape ``[d0, d1, ...]``:

* axis 0 is ``batch`` when ``d0`` equals the first input's ``d0``;
* float rank >= 3 named like a cache (``past``, ``cache``, ``key_values``): axis -2 is
  ``past_sequence`` (``encoder_sequence`` for cross-attention caches); the rest is fixed;
* float ``[B, C, T]`` named like audio features (``features``, ``mel``, ``spectrogram``,
  ``fbank``, ``audio``): C is a fixed feature axis, T is ``frames``;
* float ``[B, S, H]`` named like hidden states (``hidden``, ``embeds``, ``states``): S is a
  sequence, H is fixed; float rank 3 with no such name: both S and T are tentative and kept
  only where PyTorch runs with them changed;
* integer rank 2 (ids, positions) and rank-2 masks: axis 1 is a sequence.

Sequences are named per group: ``decoder_sequence`` for names with ``decoder``,
``encoder_sequence`` for ``encoder``/``cross``, ``sequence`` otherwise, so an encoder's and
a decoder's ids get separate symbols even when the example lengths are equal. A mask whose
length is ``past + sequence`` gets ``total_sequence``, derived from the two.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ox_quant.errors import OxQuantError

_PAST = re.compile(r"past|cache|key_values|(^|[._])kv([._]|$)", re.I)
_FEATURES = re.compile(r"feature|mel|spectrogram|fbank|audio", re.I)
_HIDDEN = re.compile(r"hidden|embed|states", re.I)
_MASK = re.compile(r"mask", re.I)
TOTAL = "total_sequence"


@dataclass(frozen=True)
class AxisChoice:
    """Axis ``axis`` of input ``input``: dynamic as symbol ``name``, or static (``name=None``)."""

    input: str
    axis: int
    name: str | None
    reason: str
    declared: bool = False
    """Given by the user (a failure is an error) rather than inferred (a guess to test)."""
    tentative: bool = False
    """Inferred but unsure: kept only when PyTorch runs with the axis changed."""


@dataclass(frozen=True)
class AxisPlan:
    """Every input axis's choice, the symbols' example sizes and the derived symbols.

    ``derived[name] = (a, b)`` means ``size(name) = size(a) + size(b)`` (a mask over past and
    current tokens)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    choices: tuple[AxisChoice, ...]
    derived: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def dynamic(self) -> tuple[AxisChoice, ...]:
        return tuple(c for c in self.choices if c.name is not None)

    def example_sizes(self) -> dict[str, int]:
        """Symbol -> its size in the example inputs (first occurrence)."""
        sizes: dict[str, int] = {}
        for c in self.dynamic:
            sizes.setdefault(c.name, self.shapes[self.names.index(c.input)][c.axis])  # type: ignore[arg-type]
        return sizes

    def independent(self) -> list[str]:
        """Dynamic symbols that are not derived from others, batch-like (axis 0) first."""
        ordered = sorted(self.example_sizes(), key=lambda s: not self.is_batch(s))
        return [s for s in ordered if s not in self.derived]

    def is_batch(self, symbol: str) -> bool:
        return any(c.name == symbol and c.axis == 0 for c in self.dynamic)

    def axes_of(self, symbol: str) -> list[AxisChoice]:
        return [c for c in self.dynamic if c.name == symbol]

    def make_static(self, symbol: str, reason: str) -> AxisPlan:
        """This plan with every axis of ``symbol`` (and of symbols derived from it) static."""
        gone = {symbol} | {d for d, parts in self.derived.items() if symbol in parts}
        choices = tuple(
            replace(c, name=None, reason=reason if c.name == symbol else f"{reason} ({c.name} depends on it)")
            if c.name in gone else c
            for c in self.choices
        )
        derived = {d: parts for d, parts in self.derived.items() if d not in gone}
        return replace(self, choices=choices, derived=derived)

    def confirm(self, symbol: str, note: str) -> AxisPlan:
        """Mark the tentative axes of ``symbol`` as kept, adding ``note`` to their reason."""
        choices = tuple(
            replace(c, tentative=False, reason=f"{c.reason}; {note}") if c.name == symbol and c.tentative else c
            for c in self.choices
        )
        return replace(self, choices=choices)

    def drop_tentative(self, reason: str) -> AxisPlan:
        plan = self
        for symbol in {c.name for c in self.dynamic if c.tentative}:
            plan = plan.make_static(symbol, reason)  # type: ignore[arg-type]
        return plan

    def resolve(self, sizes: dict[str, int]) -> dict[str, int]:
        """Sizes of every symbol: ``sizes`` where given, the example elsewhere, derived ones summed."""
        full = {**self.example_sizes(), **sizes}
        for name, (a, b) in self.derived.items():
            full[name] = full[a] + full[b]
        return full

    def shapes_at(self, sizes: dict[str, int]) -> list[tuple[int, ...]]:
        full = self.resolve(sizes)
        out = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            dims = list(shape)
            for c in self.dynamic:
                if c.input == name:
                    dims[c.axis] = full[c.name]  # type: ignore[index]
            out.append(tuple(dims))
        return out

    def inputs_at(self, inputs: Sequence[Any], sizes: dict[str, int], seed: int = 0) -> tuple[Any, ...]:
        """The example inputs resized to ``sizes`` (see ``resize``)."""
        return tuple(resize(t, shape, seed + i) for i, (t, shape) in enumerate(zip(inputs, self.shapes_at(sizes), strict=True)))

    def describe(self, symbol: str) -> str:
        """``input_ids[0]=batch`` (plus ``, mask[0]`` ... for the other axes of the symbol)."""
        axes = self.axes_of(symbol)
        text = f"{axes[0].input}[{axes[0].axis}]={symbol}"
        if len(axes) > 1:
            text += " (also " + ", ".join(f"{c.input}[{c.axis}]" for c in axes[1:]) + ")"
        return text


def second_sizes(plan: AxisPlan) -> dict[str, int]:
    """A second size for every independent symbol: batch-like ``n -> n + 2`` (1 -> 3), others
    ``n -> n - max(1, n // 4)`` (16 -> 12) or ``n + 2`` below 4, all distinct from each other
    and from the example sizes, so swapped or tied axes show."""
    example = plan.example_sizes()
    taken = set(example.values())
    out: dict[str, int] = {}
    for symbol in plan.independent():
        n = example[symbol]
        new = n + 2 if plan.is_batch(symbol) or n < 4 else n - max(1, n // 4)
        while new in taken or new < 1:
            new += 1
        taken.add(new)
        out[symbol] = new
    return out


def resize(tensor: Any, shape: Sequence[int], seed: int) -> Any:
    """``tensor`` cut or cyclically repeated to ``shape``; batch rows beyond the example's are
    made to differ, so that rows mixed up across the batch show: integers drawn afresh from
    the example's values (two-valued masks are rolled along the last axis instead), floats
    with 10 % noise. Values stay in the example's range (ids stay ids, masks stay masks)."""
    import torch

    out = tensor
    for axis, n in enumerate(shape):
        have = out.shape[axis]
        if have == n:
            continue
        if have == 0:
            extra = list(out.shape)
            extra[axis] = n
            out = torch.randn(extra, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
            continue
        out = out.index_select(axis, torch.arange(n) % have)
    rows = tensor.shape[0] if tensor.dim() else 0
    if tensor.dim() and out.shape[0] > rows > 0:
        out = out.clone()
        if out.is_floating_point():
            generator = torch.Generator().manual_seed(seed)
            scale = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
            noise = torch.randn(out[rows:].shape, generator=generator) * 0.1 * (scale or 1.0)
            out[rows:] = out[rows:] + noise.to(out.dtype)
        else:
            values = tensor.flatten().unique()
            if values.numel() > 2:  # ids, positions: fresh draws from the example's values
                generator = torch.Generator().manual_seed(seed)
                pick = torch.randint(0, values.numel(), out[rows:].shape, generator=generator)
                out[rows:] = values[pick]
            elif out.dim() >= 2:  # masks: keep each row's pattern, shifted
                for i in range(rows, out.shape[0]):
                    out[i] = out[i].roll(i, dims=-1)
    return out


def _group(name: str) -> str:
    lower = name.lower()
    if "decoder" in lower:
        return "decoder_"
    if "encoder" in lower or "cross" in lower:
        return "encoder_"
    return ""


def infer_axes(names: Sequence[str], inputs: Sequence[Any]) -> AxisPlan:
    """The default plan for example ``inputs`` named ``names`` (rules in the module doc)."""
    shapes = tuple(tuple(int(d) for d in t.shape) for t in inputs)
    floats = [bool(t.is_floating_point()) for t in inputs]
    batch = next((s[0] for s in shapes if s), None)
    choices: list[AxisChoice] = []
    sequence_like: list[tuple[str, int, int, bool]] = []  # input, axis, size, is_mask
    broadcast_masks = set()  # masks of rank >= 3: an axis matching no sequence stays static
    for name, shape, is_float in zip(names, shapes, floats, strict=True):
        rank = len(shape)
        if rank == 0:
            continue
        if shape[0] == batch:
            choices.append(AxisChoice(name, 0, "batch", f"leading axis, size {batch} in every such input"))
        else:
            choices.append(AxisChoice(name, 0, None, f"leading size {shape[0]} is not the batch size {batch}"))
        group = _group(name)
        rest: dict[int, AxisChoice] = {}
        if is_float and rank >= 3 and _PAST.search(name):
            symbol = "encoder_sequence" if group == "encoder_" else "past_sequence"
            rest[rank - 2] = AxisChoice(name, rank - 2, symbol, "cached length of a [batch, heads, past, head_dim] input")
            fixed = "heads / head size of a cached key or value"
        elif is_float and rank == 3 and _FEATURES.search(name):
            rest[2] = AxisChoice(name, 2, f"{group}frames", "time axis of a [batch, features, frames] input")
            fixed = "feature axis (e.g. mel bins) of a [batch, features, frames] input"
        elif is_float and rank == 3:
            sequence_like.append((name, 1, shape[1], False))
            unsure = not _HIDDEN.search(name)
            rest[1] = AxisChoice(name, 1, "?", "", tentative=unsure)
            if unsure:
                rest[2] = AxisChoice(name, 2, f"{name}_length", "last axis of a rank-3 input", tentative=True)
            fixed = "hidden size of a [batch, sequence, hidden] input"
        elif rank == 2 and (not is_float or _MASK.search(name)):
            sequence_like.append((name, 1, shape[1], bool(_MASK.search(name))))
            rest[1] = AxisChoice(name, 1, "?", "")
            fixed = ""
        elif rank >= 3 and _MASK.search(name):  # [B, 1, S, T] masks: axes of a sequence's length
            for axis in range(1, rank):
                if shape[axis] > 1:
                    sequence_like.append((name, axis, shape[axis], True))
                    rest[axis] = AxisChoice(name, axis, "?", "")
            broadcast_masks.add(name)
            fixed = "broadcast axis of a mask"
        else:
            fixed = "feature axis" if rank == 2 else f"fixed axis of a rank-{rank} input (channels, height, width ...)"
        for axis in range(1, rank):
            choices.append(rest.get(axis, AxisChoice(name, axis, None, fixed)))
    past = next((c for c in choices if c.name == "past_sequence"), None)
    past_size = shapes[list(names).index(past.input)][past.axis] if past else None
    named, derived = _name_sequences(sequence_like, past_size, broadcast_masks)
    final = []
    for c in choices:
        if c.name == "?":
            named_symbol, reason = named[(c.input, c.axis)]
            if c.tentative:
                reason = "first axis of a rank-3 input"
            c = replace(c, name=named_symbol, reason=reason)
        final.append(c)
    return AxisPlan(tuple(names), shapes, tuple(final), derived)


def _name_sequences(
    entries, past_size: int | None, broadcast_masks
) -> tuple[dict[tuple[str, int], tuple[str | None, str]], dict[str, tuple[str, str]]]:
    """Symbols for the sequence-like axes: one per group and length; masks join the sequence
    of their length, or ``total_sequence`` (returned as derived) when they cover past +
    current tokens."""
    derived: dict[str, tuple[str, str]] = {}
    primary: dict[str, tuple[str, int]] = {}
    out: dict[tuple[str, int], tuple[str | None, str]] = {}
    for name, axis, size, is_mask in entries:
        if is_mask:
            continue
        group = _group(name)
        if group not in primary:
            primary[group] = (name, size)
            out[(name, axis)] = (f"{group}sequence", "token axis of ids / positions / hidden states")
        elif primary[group][1] == size:
            out[(name, axis)] = (f"{group}sequence", f"same length as {primary[group][0]}")
        else:
            out[(name, axis)] = (f"{name}_length", f"length differs from {primary[group][0]}'s")
    for name, axis, size, is_mask in entries:
        if not is_mask:
            continue
        first = primary.get(_group(name)) or primary.get("")
        if first is not None and first[1] == size:
            out[(name, axis)] = (f"{_group(first[0])}sequence", f"mask over the tokens of {first[0]}")
        elif first is not None and past_size is not None and past_size + first[1] == size:
            current = f"{_group(first[0])}sequence"
            out[(name, axis)] = (TOTAL, f"mask over past + current tokens: past_sequence + {current}")
            derived[TOTAL] = ("past_sequence", current)
        elif name in broadcast_masks:
            out[(name, axis)] = (None, "mask axis of a length no sequence has")
        else:
            out[(name, axis)] = (f"{name}_length", "mask of a length no other input has")
    return out, derived


def declared_axes(names: Sequence[str], inputs: Sequence[Any], axes: Sequence[Any]) -> AxisPlan:
    """The plan for the user's ``DynamicAxis`` list: those axes dynamic, every other static.
    A mask symbol whose example size is the sum of two other non-batch symbols' sizes is
    taken as derived from them (past + current tokens)."""
    shapes = tuple(tuple(int(d) for d in t.shape) for t in inputs)
    given = {(a.input, a.axis): a.name for a in axes}
    choices = tuple(
        AxisChoice(name, axis, given[(name, axis)], "declared with --dynamic-axis", declared=True)
        if (name, axis) in given else AxisChoice(name, axis, None, "not declared dynamic")
        for name, shape in zip(names, shapes, strict=True) for axis in range(len(shape))
    )
    plan = AxisPlan(tuple(names), shapes, choices)
    sizes = plan.example_sizes()
    plain = [s for s in sizes if not plan.is_batch(s)]
    derived: dict[str, tuple[str, str]] = {}
    for symbol in plain:
        if not all(_MASK.search(c.input) for c in plan.axes_of(symbol)):
            continue
        pair = next(((a, b) for i, a in enumerate(plain) for b in plain[i + 1:]
                     if symbol not in (a, b) and sizes[a] + sizes[b] == sizes[symbol]), None)
        if pair is not None:
            derived[symbol] = pair
    return replace(plan, derived=derived)


def apply_static(plan: AxisPlan, specs: Sequence[str]) -> AxisPlan:
    """Make static the axes named by ``specs``: ``INPUT:AXIS`` or a symbol (every axis of it)."""
    for spec in specs:
        input_name, colon, axis_text = spec.rpartition(":")
        if colon and axis_text.lstrip("-").isdigit():
            matches = [c for c in plan.dynamic if c.input == input_name and c.axis == int(axis_text)]
            if len(matches) != 1:
                known = ", ".join(f"{c.input}:{c.axis}" for c in plan.dynamic) or "none"
                raise OxQuantError(f"--static-axis {spec}: not a dynamic axis (dynamic: {known})")
            c = matches[0]
            choices = tuple(
                replace(x, name=None, reason="declared with --static-axis") if x is c else x for x in plan.choices
            )
            derived = {d: p for d, p in plan.derived.items() if d != c.name or plan.axes_of(d) != [c]}
            plan = replace(plan, choices=choices, derived=derived)
        elif plan.axes_of(spec):
            plan = plan.make_static(spec, "declared with --static-axis")
        else:
            known = ", ".join(sorted(plan.example_sizes())) or "none"
            raise OxQuantError(f"--static-axis {spec}: expected INPUT:AXIS or a dynamic axis name ({known})")
    return plan
