"""Task evaluation plumbing shared by the real models: runners and results.

A *runner* hides whether a model is a ``torch.nn.Module`` or an ONNX file run by
ONNX Runtime: it takes named numpy inputs and returns the outputs as numpy arrays,
in the model's output order. Model-specific tasks (``models/tasks``) are written
against runners only, so the same evaluation scores fp32 PyTorch, fp32 ONNX and
quantized ONNX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ox_quant.errors import OxQuantError

#: Progress callback: ``(done, total, label)``. The library never prints; the CLI
#: passes a callback that draws a progress bar.
Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, label: str) -> None:
    """The default progress callback: does nothing."""


class Runner(Protocol):
    """Runs one model on named inputs."""

    backend: str
    input_names: list[str]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class TorchRunner:
    """Runs a ``torch.nn.Module`` under ``torch.inference_mode``.

    ``input_names`` gives the positional order of the module's inputs; feeds with
    other names are ignored.
    """

    backend = "torch"

    def __init__(self, module: Any, input_names: Sequence[str]):
        self.module = module.eval()
        self.input_names = list(input_names)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().numpy() for o in outs]


class OrtRunner:
    """Runs an ONNX file through ``ox_quant.runtime.session.make_session``.

    Only the feeds that the model declares as inputs are passed, so callers may
    offer optional inputs (e.g. ``token_type_ids``) that some exports lack.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", exact: bool = True,
                 threads: int | None = None):
        from ox_quant.runtime.session import make_session

        self.path = Path(path)
        self.session = make_session(self.path, provider=provider, exact=exact, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OxQuantError(
                f"{self.path.name} needs inputs {missing} that this task does not provide "
                f"(it provides {sorted(feeds)})"
            )
        return list(self.session.run(None, {n: feeds[n] for n in self.input_names}))


class CachedRunner:
    """Runs an LLM folder (``ox_quant.runtime.llm_folder``) by incremental decoding: the
    ``input_ids [B, L]`` are fed ``chunk`` tokens per step through the key-value cache and the
    steps' logits concatenated -> ``[logits [B, L, V]]``, what one full-sequence run gives."""

    backend = "onnxruntime (key-value cache)"

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", exact: bool = True,
                 threads: int | None = None, chunk: int = 1):
        from ox_quant.runtime.decode import CachedDecoder
        from ox_quant.runtime.llm_folder import read_folder

        if chunk < 1:
            raise OxQuantError(f"chunk must be >= 1, got {chunk}")
        self.path = Path(path)
        self.decoder = CachedDecoder(read_folder(path), provider=provider, threads=threads, exact=exact)
        self.input_names = ["input_ids"]
        self.chunk = chunk

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        ids = np.asarray(feeds["input_ids"], dtype=np.int64)
        cache = self.decoder.empty_cache(ids.shape[0])
        parts = []
        for start in range(0, ids.shape[1], self.chunk):
            logits, cache = self.decoder.step(ids[:, start:start + self.chunk], cache)
            parts.append(logits)
        return [np.concatenate(parts, axis=1)]


def is_onnx_path(target: object) -> bool:
    return isinstance(target, (str, os.PathLike)) and str(target).endswith(".onnx")


@dataclass
class TaskResult:
    """What one evaluation measured.

    ``metrics`` holds plain floats/ints keyed by name; ``primary`` names the one
    that summarises the task. ``notes`` are caveats that must travel with the
    numbers wherever they are shown.
    """

    task: str
    model: str
    backend: str
    primary: str
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def value(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def runner_for(
    target: Any,
    load_torch: Callable[[], Any],
    input_names: Sequence[str],
    provider: str = "cpu",
    exact: bool = True,
) -> Runner:
    """A runner for ``target``: ``None`` (``load_torch()``), a torch module, or an ONNX path.

    ``exact`` is passed to ``make_session`` (float-accuracy DQ+MatMul fusion)."""
    if target is None:
        return TorchRunner(load_torch(), input_names)
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.is_dir():
            from ox_quant.runtime.llm_folder import is_llm_folder

            if not is_llm_folder(path):
                raise OxQuantError(f"{path} is a folder without genai_config.json: not a key-value-cache LLM folder")
            return CachedRunner(path, provider=provider, exact=exact)
        if not path.is_file():
            raise OxQuantError(f"model file {path} does not exist")
        from ox_quant.runtime.llm_folder import is_llm_folder, read_folder

        if is_llm_folder(path.parent) and read_folder(path.parent).model.resolve() == path.resolve():
            return CachedRunner(path.parent, provider=provider, exact=exact)  # its cache inputs need the folder
        return OrtRunner(path, provider=provider, exact=exact)
    return TorchRunner(target, input_names)


def target_label(target: Any, default: str) -> str:
    """How a result names what was evaluated: the file name, or ``default``."""
    if isinstance(target, (str, os.PathLike)):
        return Path(target).name
    return default
