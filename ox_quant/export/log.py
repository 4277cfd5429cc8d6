"""Keeping the exporters' output off the terminal, and the one-line reason of a failure.

``captured()`` collects what torch's exporters and ONNX Runtime print while an export runs
(Python ``print``, warnings, log records, and C/C++ writes to file descriptors 1 and 2)
into a ``Captured`` log, which the CLI writes to ``--log FILE`` or shows with ``--debug``.
``exporter_reason`` pulls the root cause out of an exporter's exception chain (torch's
"step 1/3 ... Next steps" wrapper and TorchScript graph dumps are dropped) and adds a hint
for cache objects.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator

from ox_quant.errors import OxQuantError, one_line

_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")

CACHE_HINT = (
    "the model returns a cache object, which ONNX cannot carry: return tuples of tensors "
    "(Hugging Face: use_cache=False, or a wrapper returning outputs.logits); exporting a KV cache is not supported yet"
)


class ExportError(OxQuantError):
    """An export failure: one line, plus ``log``, everything the exporters printed."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class Captured:
    """Text collected by ``captured()``; ``text`` after the block ends."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self.parts.append(text if text.endswith("\n") else text + "\n")

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Handler(logging.Handler):
    def __init__(self, sink: Captured) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.add(f"[{record.levelname} {record.name}] {record.getMessage()}")


@contextlib.contextmanager
def _fds(sink: Captured) -> Iterator[None]:
    """Point file descriptors 1 and 2 at a temporary file while the block runs."""
    with tempfile.TemporaryFile(mode="w+b") as scratch:
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        saved = []
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(scratch.fileno(), fd)
        except OSError:  # no such descriptors (embedded interpreters): capture Python-level only
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            saved = []
        try:
            yield
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()  # type: ignore[union-attr]
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            scratch.seek(0)
            sink.add(scratch.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def captured() -> Iterator[Captured]:
    """Collect the exporters' output (see module doc) instead of printing it."""
    import torch  # noqa: F401  (torch configures its loggers on import; take them over after)

    sink = Captured()
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    handler = _Handler(sink)
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, _fds(sink):
            warnings.simplefilter("default")
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield sink
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        sink.add(buffer.getvalue())
        for w in caught:
            sink.add(f"[warning] {w.category.__name__}: {w.message}")


_BOILERPLATE = re.compile(r"This is step \d/\d|Next steps:|Refer to the full stack trace", re.I)


def exporter_reason(exc: BaseException) -> str:
    """The root cause of an exporter failure, one line (see module doc)."""
    chain = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # type: ignore[assignment]
    messages = []
    for item in reversed(chain):  # innermost first
        text = _clean(str(item))
        if text:
            messages.append(f"{type(item).__name__}: {text}")
    reason = messages[0] if messages else type(chain[0]).__name__
    if re.search(r"\b\w*Cache\b", str(chain[-1])):  # a class name: Cache, DynamicCache, ...
        reason += f" ({CACHE_HINT})"
    return reason


def _clean(text: str) -> str:
    """First meaningful line: ANSI colours, "step 1/3" wrappers and graph dumps removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    summary = text.split("## Exception summary", 1)
    if len(summary) == 2:
        text = summary[1]
    for line in text.splitlines():
        line = line.strip()
        if not line or _BOILERPLATE.search(line) or line.startswith(("graph(", "%", "-")):
            continue
        line = re.sub(r"^<class '[\w.]+'>: ", "", line)
        if len(line) > 160 and ". " in line[40:]:
            line = line[: line.index(". ", 40) + 1]  # the first sentence says it
        return one_line(line, 240)
    return ""


def format_failure(exc: BaseException) -> str:
    """The traceback of ``exc`` for the log."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
