"""An LLM folder: ``model.onnx`` with a key-value cache, tokenizer files and ``genai_config.json``.

``genai_config.json`` follows the layout ONNX Runtime GenAI's model builder writes
(``model.decoder.inputs/outputs`` with ``%d`` name patterns for the cache, ``search``
defaults), so ``onnxruntime_genai`` loads the folder; ox-quant reads the same file to decode.
Cache tensors are ``[batch, kv_heads, past_sequence, head_dim]`` float32 activations.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ox_quant.errors import OxQuantError

CONFIG = "genai_config.json"
MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


@dataclass(frozen=True)
class LLMFolder:
    """What decoding needs from a folder (read from its ``genai_config.json``)."""

    path: Path
    model: Path
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None
    input_names: dict[str, str]
    """``input_ids``, ``attention_mask``, ``position_ids`` (when used) -> graph input names."""
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    def past_names(self) -> list[str]:
        """``[key_0, value_0, key_1, value_1, ...]`` graph input names."""
        return [n % i for i in range(self.layers) for n in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [n % i for i in range(self.layers) for n in (self.present_key, self.present_value)]


SHARED_BUFFER_OPS = {("com.microsoft", "GroupQueryAttention")}
"""Ops whose ``present`` may be the ``past`` buffer itself (written in place)."""


def presents_share_buffers(model: str | os.PathLike, present_names: list[str]) -> bool:
    """True when every name of ``present_names`` is an output of a node in ``SHARED_BUFFER_OPS``
    (reads the graph, not the weights; ``session.graph_facts``): then a decoder may bind each
    ``past`` buffer as its own ``present``."""
    from ox_quant.runtime.session import graph_facts

    _, producers = graph_facts(model)
    return bool(present_names) and all(producers.get(name) in SHARED_BUFFER_OPS for name in present_names)


def is_llm_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def genai_config(layout: dict[str, Any], *, use_position_ids: bool = True, model_type: str = "llama",
                 share_buffer: bool = False) -> dict[str, Any]:
    """The ``genai_config.json`` content for a cache export of ``layout`` (layers, heads,
    kv_heads, head_dim, hidden, vocab_size, context_length, bos/eos_token_id).
    ``share_buffer``: ONNX Runtime GenAI's ``past_present_share_buffer`` (true where the
    presents come from GroupQueryAttention, ``presents_share_buffers``)."""
    eos = layout.get("eos_token_id")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if use_position_ids:
        inputs["position_ids"] = "position_ids"
    context = int(layout["context_length"])
    return {
        "model": {
            "bos_token_id": layout.get("bos_token_id") if layout.get("bos_token_id") is not None else eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL,
                "head_size": int(layout["head_dim"]),
                "hidden_size": int(layout["hidden"]),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": int(layout["heads"]),
                "num_hidden_layers": int(layout["layers"]),
                "num_key_value_heads": int(layout["kv_heads"]),
            },
            "eos_token_id": eos if eos is not None else -1,
            "pad_token_id": eos if eos is not None else 0,
            "type": model_type,
            "vocab_size": int(layout["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def read_folder(path: str | os.PathLike) -> LLMFolder:
    """The folder's decoding facts; ``OxQuantError`` (one line) when it is not an LLM folder."""
    p = Path(path)
    config_path = p / CONFIG
    if p.is_file():
        raise OxQuantError(f"{p.name} is a single file, not a key-value-cache LLM folder (export one with "
                           "`ox-quant export NAME --kv-cache -o DIR`)")
    if not p.is_dir():
        raise OxQuantError(f"{p} does not exist")
    if not config_path.is_file():
        raise OxQuantError(f"{p} has no {CONFIG}: not a key-value-cache LLM folder (export one with "
                           "`ox-quant export NAME --kv-cache -o DIR`)")
    try:
        config = json.loads(config_path.read_text())
        model = config["model"]
        decoder = model["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        eos = model.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        folder = LLMFolder(
            path=p,
            model=p / decoder.get("filename", MODEL),
            layers=int(decoder["num_hidden_layers"]),
            heads=int(decoder["num_attention_heads"]),
            kv_heads=int(decoder["num_key_value_heads"]),
            head_dim=int(decoder["head_size"]),
            vocab_size=int(model["vocab_size"]),
            context_length=int(model["context_length"]),
            bos_token_id=model.get("bos_token_id"),
            eos_token_id=None if eos is None or eos < 0 else int(eos),
            input_names={k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs},
            past_key=inputs["past_key_names"],
            past_value=inputs["past_value_names"],
            present_key=outputs["present_key_names"],
            present_value=outputs["present_value_names"],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OxQuantError(f"{config_path}: not a valid genai_config.json ({type(exc).__name__}: {exc})") from exc
    if not folder.model.is_file():
        raise OxQuantError(f"{p}: {folder.model.name} named by {CONFIG} does not exist")
    return folder


def model_external_files(model: Path) -> list[Path]:
    """The external data files ``model`` (an ONNX file) points at, beside it."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [model.parent / n for n in sorted(names)]
