"""Decoding an LLM folder on ONNX Runtime with its key-value cache.

``CachedDecoder.step`` runs the model on new tokens, feeding the previous ``present``
tensors back as ``past``; ``generate`` yields tokens one by one (greedy, or sampling with
temperature and top-k from a seeded generator). Batch 1 for generation; ``step`` takes
any batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.runtime.llm_folder import LLMFolder
from ox_quant.runtime.session import make_session


@dataclass(frozen=True)
class Sampling:
    """``greedy``: argmax. Else softmax of ``logits / temperature`` over the ``top_k``
    largest (0 = all), drawn with ``numpy.random.default_rng(seed)``."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise OxQuantError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise OxQuantError(f"top-k must be >= 0, got {self.top_k}")


class Cache:
    """``past`` tensors ``[B, kv_heads, P, head_dim]`` in input order, and the mask so far ``[B, P]``."""

    def __init__(self, tensors: list[np.ndarray], mask: np.ndarray):
        self.tensors = tensors
        self.mask = mask

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class CachedDecoder:
    """An ONNX Runtime session over ``folder.model`` with the cache plumbing."""

    def __init__(self, folder: LLMFolder, provider: str = "cpu", threads: int | None = None, exact: bool = True):
        self.folder = folder
        self.session = make_session(folder.model, provider=provider, exact=exact, threads=threads)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.past_names = folder.past_names()
        missing = [n for n in self.past_names if n not in graph_inputs]
        if missing:
            raise OxQuantError(f"{folder.model.name} has no key-value cache inputs ({missing[0]} missing)")
        self.output_names = ["logits", *folder.present_names()]
        self.uses_positions = "position_ids" in folder.input_names and folder.input_names["position_ids"] in graph_inputs

    def empty_cache(self, batch: int = 1) -> Cache:
        f = self.folder
        empty = np.zeros((batch, f.kv_heads, 0, f.head_dim), dtype=np.float32)
        return Cache([empty] * len(self.past_names), np.zeros((batch, 0), dtype=np.int64))

    def step(self, ids: np.ndarray, cache: Cache, mask: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
        """``ids [B, T] int64`` after ``cache`` -> ``(logits [B, T, V], the cache + T)``.
        ``mask [B, T]`` marks the new tokens (default all 1); positions count the unmasked tokens."""
        b, t = ids.shape
        new_mask = np.ones((b, t), dtype=np.int64) if mask is None else mask.astype(np.int64)
        full_mask = np.concatenate([cache.mask, new_mask], axis=1)
        if full_mask.shape[1] > self.folder.context_length:
            raise OxQuantError(f"{full_mask.shape[1]} tokens exceed the model's context of {self.folder.context_length}")
        names = self.folder.input_names
        feeds = {names["input_ids"]: ids.astype(np.int64), names["attention_mask"]: full_mask}
        if self.uses_positions:
            positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)[:, cache.length:]
            feeds[names["position_ids"]] = positions.astype(np.int64)
        feeds.update(zip(self.past_names, cache.tensors, strict=True))
        outs = self.session.run(self.output_names, feeds)
        return outs[0], Cache(list(outs[1:]), full_mask)

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling()) -> Iterator[int]:
        """Tokens after ``prompt`` (batch 1), stopping at ``max_new_tokens`` or the end token
        (which is yielded)."""
        if not prompt:
            raise OxQuantError("the prompt has no tokens")
        context = self.folder.context_length
        if len(prompt) >= context:
            raise OxQuantError(f"the prompt has {len(prompt)} tokens; the model's context is {context} "
                               f"(at most {context - 1} leave room for one new token)")
        rng = np.random.default_rng(sampling.seed)
        logits, cache = self.step(np.asarray([prompt], dtype=np.int64), self.empty_cache())
        for i in range(min(max_new_tokens, context - len(prompt))):
            token = pick(logits[0, -1], sampling, rng)
            yield token
            if token == self.folder.eos_token_id or i + 1 == max_new_tokens or cache.length + 1 > context:
                return
            logits, cache = self.step(np.asarray([[token]], dtype=np.int64), cache)


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from ``logits [V]`` under ``sampling``."""
    if sampling.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < z.size:
        cut = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))
