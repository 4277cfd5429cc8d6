"""The textbook claims a study tests, each a rule over ox-quant's measured rows.

``loss`` is the change against fp32 in the bad direction (``StudyMetric.loss``); ``lossless``
and ``noticeable`` are the task's thresholds (``ox_quant.study.metrics``). Only rows that
quantized every weight the study covers (status ``ok``) are used; a claim whose rows are
missing is ``not tested`` and says which. On SmolLM2 the int4 block:32 asymmetric row is
never used (its source weights are Q4_1: that configuration is near its source format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ox_quant.study.rows import Claim, Row, StudyResult
from ox_quant_models.tasks import TASKS


def excluded_from_claims(model: str, row: Row) -> str | None:
    """Why a row may not support any claim (None: it may): the model's study facts say."""
    task = TASKS.get(model)
    if task is None or task.study is None:
        return None
    return task.study.excluded_reason(row.bits, row.granularity, row.symmetric)


@dataclass(frozen=True)
class _Measured:
    """The numbers of a measured row (every field known) that the claims read."""

    value: float
    loss: float
    bits_per_weight: float


class _Rows:
    def __init__(self, result: StudyResult):
        self.result = result
        self.metric = result.metric
        self.by_key: dict[tuple[int, str], _Measured] = {}
        for r in result.rows:
            if r.status != "ok" or excluded_from_claims(result.model, r) is not None:
                continue
            bits, granularity, value, loss, bpw = r.bits, r.granularity, r.value, r.loss, r.bits_per_weight
            if bits is None or granularity is None or value is None or loss is None or bpw is None:
                continue  # a row without its numbers supports no claim
            self.by_key[(bits, granularity)] = _Measured(value, loss, bpw)
        self.missing: list[str] = []

    def loss(self, bits: int, granularity: str) -> float | None:
        row = self.by_key.get((bits, granularity))
        if row is None:
            self.missing.append(f"int{bits} {granularity}")
            return None
        return row.loss

    def show(self, bits: int, granularity: str) -> str:
        row = self.by_key[(bits, granularity)]
        return f"int{bits} {granularity}: {self.metric.name} {row.value:.6g}, loss {self.metric.format_loss(row.loss)}"


def _claim(key: str, statement: str, test: str, rows: _Rows,
           judge: Callable[[_Rows], tuple[str, str] | None]) -> Claim:
    rows.missing = []
    try:
        verdict = judge(rows)
    except KeyError:
        verdict = None
    if verdict is None:
        missing = ", ".join(dict.fromkeys(rows.missing)) or "rows"
        return Claim(key, statement, "not tested", f"needs measured rows for {missing}", test)
    return Claim(key, statement, verdict[0], verdict[1], test)


def _int8_tensor(r: _Rows) -> tuple[str, str] | None:
    loss = r.loss(8, "tensor")
    if loss is None:
        return None
    return ("holds" if loss >= r.metric.noticeable else "does not hold",
            f"{r.show(8, 'tensor')} ({r.metric.judge(loss)})")


def _int8_channel(r: _Rows) -> tuple[str, str] | None:
    loss = r.loss(8, "channel")
    if loss is None:
        return None
    return ("holds" if loss <= r.metric.lossless else "does not hold",
            f"{r.show(8, 'channel')} ({r.metric.judge(loss)})")


def _blocks(r: _Rows, bits: int) -> list[str]:
    return [g for (b, g) in r.by_key if b == bits and g.startswith("block:")]


def _int4_groups(r: _Rows) -> tuple[str, str] | None:
    channel = r.loss(4, "channel")
    blocks = _blocks(r, 4)
    if channel is None or not blocks:
        if not blocks:
            r.missing.append("int4 block:B")
        return None
    best = min(blocks, key=lambda g: r.by_key[(4, g)].loss)
    best_loss = r.by_key[(4, best)].loss
    evidence = f"{r.show(4, 'channel')} ({r.metric.judge(channel)}); best block {r.show(4, best)} ({r.metric.judge(best_loss)})"
    if channel >= r.metric.noticeable and best_loss < r.metric.noticeable:
        return "holds", evidence
    if channel < r.metric.noticeable:
        return "does not hold", evidence + ": per-channel int4 is already below the noticeable threshold"
    if best_loss < channel - r.metric.lossless:
        return "partly holds", evidence + ": blocks help, but int4 still loses noticeably with the best block"
    return "does not hold", evidence + ": blocks do not help (no block beats per-channel by more than the near-lossless threshold)"


def _group128(r: _Rows) -> tuple[str, str] | None:
    b128 = r.loss(4, "block:128")
    finer = [g for g in ("block:64", "block:32") if (4, g) in r.by_key]
    coarser = [g for g in ("block:256", "channel") if (4, g) in r.by_key]
    if b128 is None or not finer or not coarser:
        if not finer:
            r.missing.append("int4 block:64 or block:32")
        if not coarser:
            r.missing.append("int4 block:256 or channel")
        return None
    best_finer = min(finer, key=lambda g: r.by_key[(4, g)].loss)
    best_coarser = min(coarser, key=lambda g: r.by_key[(4, g)].loss)
    gain_finer = b128 - r.by_key[(4, best_finer)].loss
    cost_coarser = r.by_key[(4, best_coarser)].loss - b128
    fmt = r.metric.format_loss
    bpw = {g: r.by_key[(4, g)].bits_per_weight for g in ("block:128", best_finer, best_coarser)}
    evidence = (f"{r.show(4, 'block:128')} at {bpw['block:128']:.3f} bpw; going finer ({best_finer}, "
                f"{bpw[best_finer]:.3f} bpw) gains {fmt(gain_finer)}; going coarser ({best_coarser}, "
                f"{bpw[best_coarser]:.3f} bpw) costs {fmt(cost_coarser)}")
    small_gain = gain_finer <= r.metric.lossless
    real_cost = cost_coarser > r.metric.lossless
    if small_gain and real_cost:
        return "holds", evidence
    if not small_gain and not real_cost:
        return "does not hold", evidence + ": finer blocks still gain, coarser ones cost little"
    if not small_gain:
        return "partly holds", evidence + ": coarser costs, but finer blocks still gain more than the near-lossless threshold"
    return "partly holds", evidence + ": finer gains little, but coarser scales cost no more than the near-lossless threshold"


def _channel_groups(r: _Rows) -> tuple[str, str] | None:
    groups = sorted({g for (_, g) in r.by_key if g.startswith("channel-group:")})
    bits_list = sorted({b for (b, _) in r.by_key}, reverse=True)
    tol = r.metric.lossless
    parts, verdicts = [], []
    for bits in bits_list:
        for g in groups:
            if not all((bits, x) in r.by_key for x in ("tensor", "channel", g)):
                continue
            lt, lg, lc = (r.by_key[(bits, x)].loss for x in ("tensor", g, "channel"))
            between = lc - tol <= lg <= lt + tol
            verdicts.append(between)
            fmt = r.metric.format_loss
            parts.append(f"int{bits}: tensor {fmt(lt)}, {g} {fmt(lg)}, channel {fmt(lc)} "
                         f"({'between' if between else 'outside'})")
    if not verdicts:
        r.missing.append("tensor, channel-group:G and channel at one bit width")
        return None
    verdict = "holds" if all(verdicts) else "does not hold" if not any(verdicts) else "partly holds"
    return verdict, "; ".join(parts)


def evaluate_claims(result: StudyResult) -> list[Claim]:
    """Test the five claims of issue 5 on ``result``'s ox-quant rows."""
    m = result.metric
    rows = _Rows(result)
    lossless, noticeable = m.format_loss(m.lossless), m.format_loss(m.noticeable)
    return [
        _claim("int8-tensor-loses", "Per-tensor INT8 loses noticeably.",
               f"holds if the int8 tensor loss >= {noticeable}", rows, _int8_tensor),
        _claim("int8-channel-lossless", "Per-channel INT8 is near lossless.",
               f"holds if the int8 channel loss <= {lossless}", rows, _int8_channel),
        _claim("int4-needs-groups", "INT4 needs groups (blocks along K).",
               f"holds if the int4 per-channel loss >= {noticeable} and the best int4 block loss < {noticeable}",
               rows, _int4_groups),
        _claim("group128-balance", "Group (block) size 128 is a good balance.",
               f"at int4: holds if block:64/32 gain <= {lossless} over block:128 and block:256/channel "
               f"cost > {lossless} (best of each side)", rows, _group128),
        _claim("channel-group-between", "Channel-groups sit between per-tensor and per-channel.",
               f"at each bit width: holds if loss(channel) - {lossless} <= loss(channel-group) <= loss(tensor) + {lossless}",
               rows, _channel_groups),
    ]
