"""Running one quantizer in a child process: its wall time and peak resident memory.

``measured(function, *args)`` starts a fresh interpreter (``spawn``: nothing of the parent's
memory is inherited), calls ``module:function(*args)`` there and returns
``(its result, wall seconds, (peak RSS, RSS before the call))``; the peak is the child's own
``VmHWM`` (interpreter, imports and the work together, the same for every tool measured
this way); the RSS before the call (interpreter and the target's module imported) is its baseline.
An exception in the child comes back as ``ChildError`` with its type and message.
"""

from __future__ import annotations

import importlib
import multiprocessing
import queue as queues
import resource
import sys
import time
from typing import Any


class ChildError(Exception):
    """The child raised: ``type_name`` and its message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def _peak_rss_bytes() -> int:
    """This process's peak resident bytes: Linux ``VmHWM`` (kept per address space, so it starts
    afresh at exec; ``ru_maxrss`` would carry the parent's peak over the fork and exec of spawn)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux: KiB; macOS: bytes


def _current_rss_bytes() -> int:
    """Resident bytes now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _child(target: str, args: tuple[Any, ...], queue: Any) -> None:
    try:
        module, attr = target.split(":")
        function = getattr(importlib.import_module(module), attr)
        start = _current_rss_bytes()
        result = function(*args)
        queue.put(("ok", result, (_peak_rss_bytes(), start)))
    except BaseException as exc:  # reported to the parent, which decides
        queue.put(("error", (type(exc).__name__, str(exc)), (_peak_rss_bytes(), 0)))


def measured(target: str, *args: Any) -> tuple[Any, float, tuple[int, int]]:
    """``(result, seconds, (peak RSS bytes, RSS bytes before the call))`` of ``target(*args)``
    (``"module:function"``) run in a spawned child; ``ChildError`` when it raised or died."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.perf_counter()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    while True:
        try:
            status, value, peak = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if not process.is_alive():
                process.join()
                raise ChildError("ChildDied", f"the child process exited with code {process.exitcode}") from None
    process.join()
    seconds = time.perf_counter() - start
    if status == "error":
        raise ChildError(*value)
    return value, seconds, peak
