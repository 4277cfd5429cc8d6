"""Small synthetic models for tests and examples: tiny, deterministic, fast on 2 CPU cores.

Every factory returns ``(module, example_inputs)`` with the module in eval mode and its
weights drawn from a fixed seed (the global torch RNG is left untouched); Linear weights
are heavy-tailed with uneven channels, like trained ones (see ``_trained_like_``). The ``nn.Linear``
layers have K (input features) divisible by 128 where it matters, so that per-channel,
per-tensor and block-wise (32/64/128) quantization all apply.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SEED = 0


def _trained_like_(module: nn.Module) -> nn.Module:
    """Redraw every ``nn.Linear`` weight ``[N, K]`` the way trained weights look, so that
    granularities differ measurably: heavy tails (Student-t, 3 degrees of freedom) and
    output channels of unequal size (log-normal scale per channel, sigma 0.5);
    ``std ~ 1/sqrt(K)``."""
    student = torch.distributions.StudentT(3.0)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                n, k = layer.weight.shape
                channel_scale = torch.exp(0.5 * torch.randn(n, 1))
                layer.weight.copy_(student.sample((n, k)) * channel_scale / math.sqrt(3.0 * k))
    return module


def _seeded(build):
    """Run ``build()`` with torch's RNG forked and seeded with ``SEED``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return _trained_like_(build())


class MLP(nn.Module):
    """``x: [B, 128] -> [B, 64]``: Linear 128->256, GELU, Linear 256->256, GELU, Linear 256->64."""

    def __init__(self, d_in: int = 128, d_hidden: int = 256, d_out: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """A one-block causal language model.

    ``input_ids: int64 [B, S] -> logits: [B, S, vocab]``. Embedding (vocab x d), pre-LayerNorm
    multi-head self-attention (q, k, v, o: d x d), pre-LayerNorm MLP (d -> 4d -> d),
    final LayerNorm and an untied LM head (d -> vocab). ``S <= max_len``.
    """

    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, d = t.shape
        return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos[:s]
        x = self.ln1(h)
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        h = h + self.o(att.transpose(1, 2).reshape(h.shape))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(self.ln_f(h))


class CNN(nn.Module):
    """``image: [B, 3, 16, 16] -> logits [B, 10]``: two 3x3 convs, 4x4 average pool,
    Linear 512->128, ReLU, Linear 128->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv2(F.relu(self.conv1(image)))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _example(shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(*shape, generator=generator)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MLP 128 -> 256 -> 256 -> 64; example input ``float32 [4, 128]``."""
    return _seeded(MLP).eval(), (_example((4, 128)),)


def transformer_block() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """One-block causal LM, vocab 256, d 128, 4 heads; example ``int64 [2, 16]`` token ids."""
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    return _seeded(TransformerBlock).eval(), (ids,)


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small CNN classifier; example input ``float32 [2, 3, 16, 16]``."""
    return _seeded(CNN).eval(), (_example((2, 3, 16, 16)),)


#: The toy Llama's shape: 2 layers, 4 query heads sharing 2 key-value heads of 32 (GQA).
TOY_LLAMA_POSITIONS = 64


def causal_lm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A 2-layer Llama (``ox_quant_models.smollm2.Llama``: RoPE, RMSNorm, SwiGLU, tied head)
    with vocab 256 (one token per byte, see :func:`tokenizer`), hidden 128, 4 heads / 2
    key-value heads, MLP 256, context 64; example ``int64 [1, 12]``. Token 0 (the byte
    ``\\x00``) is its end-of-sequence token."""
    from ox_quant_models.gguf_llama import LlamaConfig
    from ox_quant_models.smollm2 import Llama

    cfg = LlamaConfig(vocab_size=256, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
                      rope_theta=10000.0, rms_eps=1e-5, context_length=TOY_LLAMA_POSITIONS)

    def build() -> nn.Module:
        return Llama(cfg, max_positions=TOY_LLAMA_POSITIONS, bos_token_id=None, eos_token_id=0)

    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(1, 256, (1, 12), generator=generator)
    return _seeded(build).eval(), (ids,)


def tokenizer():
    """A byte-level ``tokenizers.Tokenizer`` for :func:`causal_lm`: token ``i`` is byte ``i``
    (GPT-2's byte-to-symbol alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_symbols() -> list[str]:
    """GPT-2's printable symbol for each byte value 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = 0
    out = []
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out
