"""How a study judges a change of a task's metric.

A study metric has a direction, says whether its change is read relative to fp32, and carries
the two thresholds the claims use: a loss at most ``lossless`` is *near lossless*; a loss of at
least ``noticeable`` is *noticeable* (in between: small). Each model's metric is one of its
study facts, kept with its task in the model zoo (``ox_quant_models.tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyMetric:
    """The metric a study reports for one task and how a change of it is judged."""

    task: str
    name: str
    higher_is_better: bool
    relative: bool
    """True: the change is ``candidate / fp32 - 1`` (shown in %); False: ``candidate - fp32``."""
    lossless: float
    noticeable: float
    why: str

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def change(self, value: float, fp32: float) -> float:
        """Signed change of ``value`` against ``fp32`` (relative or absolute, see ``relative``)."""
        if self.relative:
            return value / fp32 - 1.0 if fp32 else float("inf")
        return value - fp32

    def loss(self, value: float, fp32: float) -> float:
        """The change in the bad direction: positive = worse than fp32."""
        change = self.change(value, fp32)
        return -change if self.higher_is_better else change

    def format_change(self, change: float) -> str:
        """``+1.23%`` (relative), ``x2.41e+06`` (relative, beyond +900%), ``+0.0123`` (absolute)."""
        if not self.relative:
            return f"{change:+.4g}"
        return f"x{1 + change:.3g}" if change > 9 else f"{change * 100:+.2f}%"

    def format_loss(self, loss: float) -> str:
        if not self.relative:
            return f"{loss:.4g}"
        ratio = 1 + loss if not self.higher_is_better else 1 - loss
        return f"x{ratio:.3g}" if loss > 9 else f"{loss * 100:.2f}%"

    def judge(self, loss: float) -> str:
        """``near lossless``, ``small`` or ``noticeable``."""
        if loss <= self.lossless:
            return "near lossless"
        if loss >= self.noticeable:
            return "noticeable"
        return "small"
