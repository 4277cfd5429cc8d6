"""Read a llama-architecture GGUF file: hyper-parameters, fp32 weights, BPE tokenizer.

Weights are dequantized with the ``gguf`` package (``gguf.quants.dequantize``) to
float32 ``[out, in]`` arrays (the ``torch.nn.Linear`` layout). llama.cpp's converter
permutes the rows of ``attn_q``/``attn_k`` so that GGML's adjacent-pair RoPE
applies; :func:`unpermute_rope_rows` undoes that so the usual half-split RoPE
(``rotate_half``) applies, as in the original checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError

TOKEN_TYPE_CONTROL = 3


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float
    rms_eps: float
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class GGUFContents:
    config: LlamaConfig
    weights: dict[str, np.ndarray]  # GGUF tensor name -> float32 array, [out, in] for matrices
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name (e.g. "Q4_1")
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pre_tokenizer: str


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise OxQuantError(f"GGUF file lacks {key!r}")
    return field.contents()


def _optional(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf(path: Path) -> GGUFContents:
    """Everything needed to rebuild the model in torch. Raises OxQuantError for non-llama files."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise OxQuantError(f"{path.name}: architecture {arch!r} is not llama")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    heads = int(_field(reader, "llama.attention.head_count"))
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden=int(_field(reader, "llama.embedding_length")),
        layers=int(_field(reader, "llama.block_count")),
        heads=heads,
        kv_heads=int(_optional(reader, "llama.attention.head_count_kv") or heads),
        intermediate=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_optional(reader, "llama.rope.freq_base") or 10000.0),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context_length=int(_field(reader, "llama.context_length")),
    )
    weights: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # owned copy
        weights[tensor.name] = array.reshape([int(d) for d in reversed(tensor.shape)])
        types[tensor.name] = tensor.tensor_type.name
    return GGUFContents(
        config=config,
        weights=weights,
        tensor_types=types,
        tokens=tokens,
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        merges=[str(m) for m in _field(reader, "tokenizer.ggml.merges")],
        bos_id=_optional(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_optional(reader, "tokenizer.ggml.eos_token_id"),
        pre_tokenizer=str(_optional(reader, "tokenizer.ggml.pre") or "default"),
    )


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation.

    Rows of each head are stored as ``(pair i, half h)`` interleaved; this returns
    them as ``(half h, pair i)``: ``[n_head * d, K] -> [n_head * d, K]`` with
    ``w.reshape(n_head, d/2, 2, K).swapaxes(1, 2)``.
    """
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def build_tokenizer(contents: GGUFContents):
    """A ``tokenizers`` byte-level BPE tokenizer from the GGUF vocab and merges.

    Pre-tokenisation follows llama.cpp's ``smollm``/``gpt2`` rules: single digits
    split off (``smollm`` only), then the GPT-2 regex over byte-level symbols.
    Control tokens are added as special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if contents.pre_tokenizer not in ("smollm", "gpt2", "default"):
        raise OxQuantError(f"GGUF pre-tokenizer {contents.pre_tokenizer!r} is not supported")
    vocab = {tok: i for i, tok in enumerate(contents.tokens)}
    merges = []
    for line in contents.merges:
        left, sep, right = line.partition(" ")
        if not sep:
            raise OxQuantError(f"GGUF merge {line!r} is not 'left right'")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    steps: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if contents.pre_tokenizer == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(contents.tokens, contents.token_types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok
