"""Tiny models with the input layouts that make dynamic axes hard to guess, for the export
tests: each factory returns ``(module, example_inputs)`` with batch-1 examples, tiny
dimensions and weights from a fixed seed (the global torch RNG is left untouched).

* ``batch_one_fast_path``: ``input_ids [B, S]``; a ``B == 1`` branch reshapes with a
  literal 1, so PyTorch runs at every batch but an export traced at batch 1 does not.
* ``batch_one_reshape``: ``input_ids [B, S]``; reshapes with a literal 1 always, so the
  model itself only runs at batch 1.
* ``encoder_decoder``: ``input_ids [B, S], attention_mask [B, S], decoder_input_ids
  [B, T]`` -> logits ``[B, T, vocab]``; S and T are independent lengths.
* ``audio_encoder``: ``input_features [B, 80, frames]`` -> ``[B, frames, 16]``; the 80
  mel bins are a fixed feature axis (Conv1d channels).
* ``past_key_values``: ``input_ids [B, S], attention_mask [B, P + S], past_key /
  past_value [B, heads, P, head_dim]`` -> logits and the updated key / value ``[B, heads,
  P + S, head_dim]``.
* ``returns_cache``: returns logits and a cache object that is not a tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SEED = 0
VOCAB = 32
D = 16
HEADS = 2


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build().eval()


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(SEED + seed))


class _Heads(nn.Module):
    """``x [B, S, D]`` -> attention over its own tokens -> ``[B, S, D]`` (no mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, batch_one: bool = False) -> torch.Tensor:
        b, s, _ = x.shape
        split = (1, s, HEADS, D // HEADS) if batch_one else (b, s, HEADS, D // HEADS)
        q, k, v = (t.reshape(split).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, s, D))


class BatchOneFastPath(nn.Module):
    """``input_ids [B, S] -> logits [B, S, vocab]``; ``B == 1`` takes a reshape with a literal 1."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.att = _Heads()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(input_ids)
        return self.head(h + self.att(h, batch_one=input_ids.shape[0] == 1))


class BatchOneReshape(BatchOneFastPath):
    """Like ``BatchOneFastPath`` but the literal-1 reshape is taken at every batch size."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(input_ids)
        return self.head(h + self.att(h, batch_one=True))


class EncoderDecoder(nn.Module):
    """``input_ids [B, S], attention_mask [B, S], decoder_input_ids [B, T] -> logits [B, T, vocab]``:
    the decoder tokens attend to the (masked) encoder tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.encoder = _Heads()
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        memory = self.tok(input_ids)
        memory = memory + self.encoder(memory)
        x = self.tok(decoder_input_ids)
        k, v = self.kv(memory).chunk(2, dim=-1)
        scores = self.q(x) @ k.transpose(-1, -2) / math.sqrt(D)  # [B, T, S]
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        return self.head(x + torch.softmax(scores, dim=-1) @ v)


class AudioEncoder(nn.Module):
    """``input_features [B, 80, frames] -> [B, frames, 16]``: Conv1d over the 80 mel bins, GELU, Linear."""

    def __init__(self, mel_bins: int = 80) -> None:
        super().__init__()
        self.conv = nn.Conv1d(mel_bins, D, 3, padding=1)
        self.proj = nn.Linear(D, D)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.gelu(self.conv(input_features)).transpose(1, 2))


class PastKeyValues(nn.Module):
    """One attention step with a key/value cache.

    ``input_ids [B, S], attention_mask [B, P + S] (1 = attend), past_key, past_value
    [B, heads, P, head_dim]`` -> ``logits [B, S, vocab], key, value [B, heads, P + S, head_dim]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s = input_ids.shape
        x = self.tok(input_ids)
        q, k, v = (t.reshape(b, s, HEADS, D // HEADS).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        scores = q @ key.transpose(-1, -2) / math.sqrt(D // HEADS)  # [B, heads, S, P + S]
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, -1e9)
        att = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).reshape(b, s, D)
        return self.head(x + att), key, value


class Cache:
    """A cache object as language-model libraries return one: tensors inside, not a tensor."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value


class ReturnsCache(nn.Module):
    """``input_ids [B, S] -> (logits [B, S, vocab], Cache)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Cache]:
        h = self.tok(input_ids)
        return self.head(h), Cache(h, h)


def batch_one_fast_path() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``BatchOneFastPath``; example ``input_ids int64 [1, 8]``."""
    return _seeded(BatchOneFastPath), (_ids(1, 8),)


def batch_one_reshape() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``BatchOneReshape``; example ``input_ids int64 [1, 8]``."""
    return _seeded(BatchOneReshape), (_ids(1, 8),)


def encoder_decoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``EncoderDecoder``; examples of equal length ``[1, 6]`` (only the names tell them apart)."""
    mask = torch.ones(1, 6, dtype=torch.int64)
    mask[0, -1] = 0
    return _seeded(EncoderDecoder), (_ids(1, 6), mask, _ids(1, 6, seed=2))


def audio_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``AudioEncoder``; example ``input_features float32 [1, 80, 12]``."""
    features = torch.randn(1, 80, 12, generator=torch.Generator().manual_seed(SEED + 1))
    return _seeded(AudioEncoder), (features,)


def past_key_values() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``PastKeyValues``; examples ``input_ids [1, 4]``, ``attention_mask [1, 10]``,
    ``past_key / past_value [1, 2, 6, 8]`` (6 cached positions + 4 new ones)."""
    generator = torch.Generator().manual_seed(SEED + 3)
    past = torch.randn(2, 1, HEADS, 6, D // HEADS, generator=generator)
    return _seeded(PastKeyValues), (_ids(1, 4), torch.ones(1, 10, dtype=torch.int64), past[0], past[1])


def returns_cache() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``ReturnsCache``; example ``input_ids int64 [1, 5]``."""
    return _seeded(ReturnsCache), (_ids(1, 5),)
