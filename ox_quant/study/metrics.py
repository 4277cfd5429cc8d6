"""What a granularity study measures on each real model, and what counts as a loss.

Each task's study metric, its direction, whether its change is read relative to fp32, and the
two thresholds the claims use: a loss at most ``lossless`` is *near lossless*; a loss of at
least ``noticeable`` is *noticeable* (in between: small). Fixed before any study was run;
``docs/study/README.md`` repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ox_quant.errors import OxQuantError


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


METRICS: dict[str, StudyMetric] = {
    "minilm": StudyMetric(
        "minilm", "cosine_mean", higher_is_better=True, relative=False, lossless=0.002, noticeable=0.005,
        why="mean cosine between each sentence's embedding and its fp32 embedding (fp32 = 1)",
    ),
    "smollm2": StudyMetric(
        "smollm2", "perplexity", higher_is_better=False, relative=True, lossless=0.01, noticeable=0.03,
        why="perplexity on the Austen texts; change read relative to fp32",
    ),
    "crepe-tiny": StudyMetric(
        "crepe-tiny", "cents_error_mean", higher_is_better=False, relative=False, lossless=1.0, noticeable=5.0,
        why="mean absolute pitch error in cents over 64 frames (raw pitch accuracy, the task's primary "
            "metric, moves in steps of 1/64 and is reported beside it)",
    ),
    "ppocr-rec": StudyMetric(
        "ppocr-rec", "cer", higher_is_better=False, relative=False, lossless=0.003, noticeable=0.01,
        why="character error rate over 8 rendered lines, 342 characters (one character = 0.0029)",
    ),
}


def metric_for(task: str) -> StudyMetric:
    try:
        return METRICS[task]
    except KeyError:
        raise OxQuantError(f"no study metric for task {task!r}: use one of {', '.join(sorted(METRICS))}") from None
