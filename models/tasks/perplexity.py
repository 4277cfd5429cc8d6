"""SmolLM2 task: perplexity on text.

Text: a file the caller names, or by default every text of the project's text
directory (the Austen novels shipped in the package; see ``ox_quant.evaluation.textdata``), each contributing an
equal share of ``max_tokens`` from its start. Each file's tokens are cut into
non-overlapping windows of ``context`` tokens (a final window shorter than 2 tokens
is dropped); every window is run on its own, and the model predicts tokens 2..L of
it. ``perplexity = exp(sum NLL / n_predicted)`` with
``NLL_t = logsumexp(logits_{t-1}) - logits_{t-1}[token_t]``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.evaluation.tasks import Progress, TaskResult, no_progress, runner_for, target_label
from ox_quant.evaluation.textdata import read_text, text_files, text_name
from ox_quant_models import smollm2

DEFAULT_MAX_TOKENS = 2048
DEFAULT_CONTEXT = 512
#: Characters read per wanted token before falling back to the whole file (English text
#: averages about 4 characters per token); the last token of a prefix may be cut, so one
#: more token than needed is asked for.
CHARS_PER_TOKEN_BOUND = 12


def windows(token_lists: list[list[int]], context: int) -> list[np.ndarray]:
    """Non-overlapping windows ``int64 [1, <=context]`` of each list, in order."""
    out = []
    for tokens in token_lists:
        for start in range(0, len(tokens), context):
            chunk = tokens[start:start + context]
            if len(chunk) >= 2:
                out.append(np.asarray([chunk], dtype=np.int64))
    return out


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed NLL of ``ids[0, 1:]`` under ``logits[0, :-1]`` (``[1, L, V]``) and the count L-1."""
    import torch

    z = torch.from_numpy(np.ascontiguousarray(logits[0, :-1], dtype=np.float32))
    target = torch.from_numpy(ids[0, 1:])
    nll = torch.logsumexp(z, dim=-1).double() - z.gather(1, target[:, None])[:, 0].double()
    return float(nll.sum()), int(target.numel())


def load_token_lists(text: str | os.PathLike | None, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Token lists (one per source file) totalling at most ``max_tokens``, and the file names."""
    tok = smollm2.tokenizer()
    paths = [Path(text)] if text is not None else text_files()
    share = math.ceil(max_tokens / len(paths))
    lists = []
    for path in paths:
        text = read_text(path)
        prefix = text[:share * CHARS_PER_TOKEN_BOUND]  # tokenising whole novels costs seconds
        ids = tok.encode(prefix).ids
        if len(ids) < share + 1 and len(prefix) < len(text):
            ids = tok.encode(text).ids
        ids = ids[:share]
        if len(ids) < 2:
            raise OxQuantError(f"text file {path} has fewer than 2 tokens")
        lists.append(ids)
    return lists, [text_name(p) for p in paths]


def evaluate(target: Any = None, *, provider: str = "cpu", exact: bool = True,
             progress: Progress = no_progress,
             text: str | os.PathLike | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
             context: int = DEFAULT_CONTEXT) -> TaskResult:
    """Perplexity of ``target`` (None = fp32 torch SmolLM2, a module, or an ONNX path)."""
    if max_tokens < 2:
        raise OxQuantError(f"max tokens must be at least 2, got {max_tokens}")
    if not 2 <= context <= smollm2.MAX_POSITIONS:
        raise OxQuantError(f"context must be between 2 and {smollm2.MAX_POSITIONS}, got {context}")
    start = time.perf_counter()
    token_lists, names = load_token_lists(text, max_tokens)
    batches = windows(token_lists, context)
    runner = runner_for(target, smollm2.load, smollm2.INPUT_NAMES, provider, exact)
    total_nll, count = 0.0, 0
    for i, ids in enumerate(batches):
        progress(i, len(batches), f"window {i + 1}/{len(batches)}")
        nll, n = window_nll(runner({"input_ids": ids})[0], ids)
        total_nll += nll
        count += n
    progress(len(batches), len(batches), "done")
    mean = total_nll / count
    return TaskResult(
        task="smollm2",
        model=target_label(target, "smollm2 (fp32 torch, dequantized Q4_1)"),
        backend=runner.backend,
        primary="perplexity",
        metrics={"perplexity": math.exp(mean), "nll_mean": mean, "tokens_scored": count},
        details={"texts": names, "tokens": sum(len(t) for t in token_lists), "context": context,
                 "windows": len(batches)},
        notes=[smollm2.CAVEAT],
        seconds=time.perf_counter() - start,
    )
