"""Calibration feeds for the study's algorithm rows, from text the tasks do not score.

SmolLM2: consecutive token windows of ``emma.txt`` (the study then scores perplexity on
another text and refuses to score this one). MiniLM: sentences of ``emma.txt`` (Austen
prose), while its task scores the project's paraphrase pairs (``sentences.py``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.evaluation.textdata import read_text, text_files, text_name

CALIBRATION_TEXT = "emma.txt"
SENTENCES_PER_FEED = 4
#: Characters skipped at the start of the text (the title page and chapter heading).
SKIP_CHARS = 2000


def _text() -> str:
    for path in text_files():
        if text_name(path) == CALIBRATION_TEXT:
            return read_text(path)[SKIP_CHARS:]
    raise OxQuantError(f"calibration text {CALIBRATION_TEXT} is missing from the bundled texts")


def smollm2_feeds(samples: int, seq_len: int) -> tuple[str, str, list[dict[str, Any]]]:
    """``samples`` windows ``input_ids int64 [1, seq_len]`` of consecutive tokens."""
    from ox_quant_models import smollm2

    text = _text()
    ids = smollm2.tokenizer().encode(text[: samples * seq_len * 8]).ids
    if len(ids) < samples * seq_len:
        raise OxQuantError(f"{CALIBRATION_TEXT} has fewer than {samples} x {seq_len} tokens")
    feeds = [{"input_ids": np.asarray(ids[i * seq_len:(i + 1) * seq_len], dtype=np.int64)[None, :]}
             for i in range(samples)]
    return CALIBRATION_TEXT, f"{CALIBRATION_TEXT}: {samples} windows of {seq_len} tokens", feeds


def sentences_of(text: str, count: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``count`` sentences of ``text`` with ``min_words..max_words`` words (whitespace joined)."""
    flat = re.sub(r"\s+", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat)]
    chosen = [s for s in found if min_words <= len(s.split()) <= max_words]
    return chosen[:count]


def minilm_feeds(samples: int, seq_len: int) -> tuple[str, str, list[dict[str, Any]]]:
    """``samples`` batches of 4 sentences (``input_ids``, ``attention_mask``, int64 ``[4, T]``,
    at most ``seq_len`` tokens)."""
    from ox_quant_models import minilm

    wanted = samples * SENTENCES_PER_FEED
    chosen = sentences_of(_text(), wanted)
    if len(chosen) < wanted:
        raise OxQuantError(f"{CALIBRATION_TEXT} has fewer than {wanted} sentences of 6-40 words")
    feeds = []
    for i in range(samples):
        batch = minilm.encode(chosen[i * SENTENCES_PER_FEED:(i + 1) * SENTENCES_PER_FEED])
        feeds.append({k: batch[k][:, :seq_len] for k in minilm.INPUT_NAMES})
    return (CALIBRATION_TEXT, f"{CALIBRATION_TEXT}: {samples} batches of {SENTENCES_PER_FEED} sentences "
            f"(at most {seq_len} tokens), not the scored paraphrase set", feeds)
