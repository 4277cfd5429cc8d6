"""Decoding an LLM folder on ONNX Runtime with its key-value cache.

``CachedDecoder.step`` runs the model on new tokens, feeding the previous ``present``
tensors back as ``past``; ``generate`` yields tokens one by one (greedy, or sampling with
temperature and top-k from a seeded generator). Batch 1 for generation; ``step`` takes
any batch.

Where every ``present`` comes from a GroupQueryAttention node (``presents_share_buffers``),
the cache lives in buffers longer than it, bound by I/O binding as both ``past`` and
``present``: the kernel writes the new rows in place, and no step copies the whole cache
(ONNX Runtime's shared past/present buffer). Other graphs get ``past`` arrays and return
new ``present`` arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ox_quant.errors import OxQuantError
from ox_quant.runtime.llm_folder import LLMFolder, presents_share_buffers
from ox_quant.runtime.session import make_session

MIN_CAPACITY = 256
"""Rows a shared cache buffer is made with at least; a step that needs more makes buffers of
twice what it needs (at most the context) and copies the cache over."""


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


class SharedBuffers:
    """Cache buffers ``[B, kv_heads, C, head_dim]`` float32, one per past input, and the
    ``OrtValue`` over each (same memory)."""

    def __init__(self, tensors: list[np.ndarray], capacity: int):
        b, kv, p, d = tensors[0].shape
        self.arrays = [np.zeros((b, kv, capacity, d), dtype=np.float32) for _ in tensors]
        for array, tensor in zip(self.arrays, tensors, strict=True):
            array[:, :, :p] = tensor
        from ox_quant.runtime.ort import load

        ort = load()
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    @property
    def capacity(self) -> int:
        return int(self.arrays[0].shape[2])

    @property
    def batch(self) -> int:
        return int(self.arrays[0].shape[0])


class Cache:
    """The key-value cache after some steps: ``tensors`` ``[B, kv_heads, P, head_dim]`` per past
    input (in input order) and the mask so far ``mask [B, P]``.

    With ``buffers`` (a decoder with shared buffers) the tensors are views of the buffers' first
    ``P`` rows, and the next step writes rows ``P .. P+T-1`` of the same buffers in place. Such a
    cache is meant to be stepped from once: a second step from it overwrites those rows, which
    the first step's cache holds (rows below ``P`` stay valid in both)."""

    def __init__(self, tensors: list[np.ndarray], mask: np.ndarray, buffers: SharedBuffers | None = None):
        self._tensors = tensors
        self.mask = mask
        self.buffers = buffers

    @property
    def tensors(self) -> list[np.ndarray]:
        if self.buffers is None:
            return self._tensors
        return [a[:, :, :self.length] for a in self.buffers.arrays]

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
        self.shared = presents_share_buffers(folder.model, folder.present_names())
        """Decode in shared past/present buffers (module doc)."""

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
        if self.shared:
            return self._step_shared(feeds, cache, full_mask)
        feeds.update(zip(self.past_names, cache.tensors, strict=True))
        outs = self.session.run(self.output_names, feeds)
        return outs[0], Cache(list(outs[1:]), full_mask)

    def _step_shared(self, feeds: dict[str, np.ndarray], cache: Cache,
                     full_mask: np.ndarray) -> tuple[np.ndarray, Cache]:
        """:meth:`step` with the cache buffers bound as both past and present (written in place)."""
        needed = full_mask.shape[1]
        buffers = cache.buffers
        if buffers is None or buffers.capacity < needed or buffers.batch != full_mask.shape[0]:
            capacity = max(needed, min(self.folder.context_length, max(MIN_CAPACITY, 2 * needed)))
            buffers = SharedBuffers(cache.tensors, capacity)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_names[0])
        for past, present, value in zip(self.past_names, self.output_names[1:], buffers.values, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), Cache([], full_mask, buffers)

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
