"""Grouped-query attention over a key-value cache that exports as one ONNX Runtime
``com.microsoft.GroupQueryAttention`` node.

A decoder step's attention, written as ONNX primitives, is about a dozen nodes per layer
(split of the stacked q/k/v, cache concatenations, two matrix products, mask add, softmax and
the reshapes between); at batch 1 each node's fixed cost in ONNX Runtime weighs as much as its
arithmetic. ``GroupQueryAttention`` does all of it in one kernel.

The kernel takes ``seqlens_k`` (per row, the total length - 1) and a causal flag instead of a
padding mask. Here every row is given the full length ``P + T`` and the padding and causal
mask come in as ``attention_bias`` (additive, ``[B, 1, T, P + T]``), so left-padded batches
keep their exact meaning; ``query_seqlens`` (``T`` per row) lets several rows take several new
tokens after a cache, which the kernel refuses without it. Rotary embedding stays outside (the
kernel's own rotary reads its positions from the row lengths, not from ``position_ids`` on a
first prompt). Bound by I/O binding so that each ``past`` buffer (longer than ``P``) is also
its ``present``, the kernel writes the new rows in place (ONNX Runtime's shared past/present
buffer; ``P`` must then come from the mask, as ``cache_lengths`` takes it).
"""

from __future__ import annotations

import torch


def attention_reference(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, bias: torch.Tensor,
                        heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv [B, T, (H + 2 kv) d]`` (q heads, then k heads, then v heads), ``past_k/v [B, kv, P, d]``,
    ``bias [B, 1, T, P + T]`` -> ``(out [B, T, H d], present_k/v [B, kv, P + T, d])`` with
    ``out_h = softmax(scale * q_h k_g^T + bias) v_g`` for query head ``h`` of key-value head
    ``g = h // (H / kv)``."""
    b, t, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    group = heads // kv_heads
    x = qkv.reshape(b, t, heads + 2 * kv_heads, d).transpose(1, 2)
    q, k, v = x.split([heads, kv_heads, kv_heads], dim=1)
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    scores = scale * (q.reshape(b, kv_heads, group * t, d) @ present_k.transpose(-1, -2)) + bias.repeat(1, 1, group, 1)
    out = (scores.softmax(-1) @ present_v).reshape(b, heads, t, d).transpose(1, 2).reshape(b, t, heads * d)
    return out, present_k, present_v


class _GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total_length, query_lengths, bias, heads: int, kv_heads: int,
                scale: float):
        return attention_reference(qkv, past_k, past_v, bias, heads, kv_heads, scale)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total_length, query_lengths, bias, heads: int, kv_heads: int,
                 scale: float):
        def none():
            node = g.op("prim::Constant")
            node.setType(torch._C.OptionalType.ofTensor())
            return node

        return g.op("com.microsoft::GroupQueryAttention", qkv, none(), none(), past_k, past_v, seqlens_k,
                    total_length, none(), none(), none(), bias, none(), none(), none(), none(), none(),
                    query_lengths, num_heads_i=heads, kv_num_heads_i=kv_heads,
                    scale_f=scale, outputs=3)


def cache_lengths(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``attention_mask [B, P + T]``, ``input_ids [B, T]`` -> ``(seqlens_k [B] int32 = P + T - 1,
    total [] int32 = P + T, query_seqlens [B] int32 = T)``: every row at full length (the
    padding is in the bias). ``query_seqlens`` lets a batch of several rows take several new
    tokens after a cache (the kernel refuses that without it)."""
    ones = torch.ones_like(attention_mask)
    return ((ones.sum(1) - 1).to(torch.int32), ones[0].sum().to(torch.int32),
            torch.ones_like(input_ids).sum(1).to(torch.int32))


def group_query_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, lengths: tuple[torch.Tensor, ...],
                          bias: torch.Tensor, heads: int, kv_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_reference` in eager mode; one ``GroupQueryAttention`` node in a
    TorchScript export. ``lengths`` from :func:`cache_lengths`."""
    return _GroupQueryAttention.apply(qkv, past_k, past_v, *lengths, bias, heads, kv_heads, scale)
