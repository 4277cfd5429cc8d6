"""Shared rendering helpers for commands: number formatting, metrics tables, quiet torch."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.table import Table

from ox_quant.core.metrics import OutputMetrics


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def db(value: float) -> str:
    return fmt(value) if not math.isfinite(value) else f"{value:.2f}"


def metrics_table(title: str, metrics: Sequence[OutputMetrics]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("output", "shape", "max abs err", "mean abs err", "rel L2", "SQNR dB", "cosine", "argmax", "top-5"):
        table.add_column(column, justify="left" if column in ("output", "shape") else "right")
    for m in metrics:
        table.add_row(
            m.name,
            "x".join(str(d) for d in m.shape),
            fmt(m.max_abs_err),
            fmt(m.mean_abs_err),
            fmt(m.rel_l2),
            db(m.sqnr_db),
            f"{m.cosine:.6f}" if math.isfinite(m.cosine) else fmt(m.cosine),
            fmt(m.argmax_agreement),
            fmt(m.top5_agreement),
        )
    return table


def console() -> Console:
    """Console on stdout; 160 columns when stdout is not a terminal (pipes, tests)."""
    out = Console(soft_wrap=True)
    return out if out.is_terminal else Console(soft_wrap=True, width=160)


@contextlib.contextmanager
def quiet_torch(load: bool = True) -> Iterator[None]:
    """Silence torch's exporter warnings and log lines while a command runs (CLI only).

    torch sets its loggers' levels when it is imported, so ``load`` imports it first."""
    if load:
        import torch  # noqa: F401
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
