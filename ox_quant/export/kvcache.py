"""Key-value-cache export of a causal LM to an LLM folder (``ox_quant.runtime.llm_folder``).

A module qualifies when it has

* ``forward_cached(input_ids, attention_mask, position_ids, past) -> (logits, present)``:
  ``input_ids, position_ids [B, T] int64``, ``attention_mask [B, P+T] int64``, ``past`` a list
  ``[k_0, v_0, k_1, v_1, ...]`` of ``[B, kv_heads, P, head_dim]`` float32 (``P`` may be 0),
  ``present`` the same at length ``P+T``;
* ``cache_layout() -> dict`` with ``layers, heads, kv_heads, head_dim, hidden, vocab_size,
  context_length, bos_token_id, eos_token_id``.

The graph's inputs are ``input_ids, attention_mask, position_ids, past_key_values.{i}.key/value``
and its outputs ``logits, present.{i}.key/value``; batch, sequence and past length are dynamic
(inferred by ``ox_quant.export.axes``: ``total_sequence = past_sequence + sequence`` for the mask)
and checked on ONNX Runtime against PyTorch at the example and at second sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ox_quant.errors import OxQuantError
from ox_quant.export.exporter import ExportReport, export_model
from ox_quant.runtime.llm_folder import (
    MODEL,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    TOKENIZER,
    TOKENIZER_CONFIG,
    genai_config,
    presents_share_buffers,
)

LAYOUT_KEYS = ("layers", "heads", "kv_heads", "head_dim", "hidden", "vocab_size", "context_length")
#: Example sizes of the export: batch 2, 5 new tokens after 3 cached ones.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 5, 3


def cache_layout(module: Any) -> dict[str, Any]:
    """``module.cache_layout()`` checked; ``OxQuantError`` when the module has no cache path."""
    if not callable(getattr(module, "forward_cached", None)) or not callable(getattr(module, "cache_layout", None)):
        raise OxQuantError(f"{type(module).__name__} has no key-value cache path: --kv-cache needs a module with "
                           "forward_cached(input_ids, attention_mask, position_ids, past) and cache_layout()")
    layout = dict(module.cache_layout())
    missing = [k for k in LAYOUT_KEYS if not isinstance(layout.get(k), int)]
    if missing:
        raise OxQuantError(f"{type(module).__name__}.cache_layout() lacks integer {', '.join(missing)}")
    if layout["heads"] % layout["kv_heads"]:
        raise OxQuantError(f"{layout['heads']} heads are not a multiple of {layout['kv_heads']} key-value heads")
    return layout


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [n % i for i in range(layers) for n in (PAST_KEY, PAST_VALUE)]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [n % i for i in range(layers) for n in (PRESENT_KEY, PRESENT_VALUE)]


def _wrapper(module: Any):
    """``nn.Module`` with the flat signature ``(input_ids, attention_mask, position_ids, *past) ->
    (logits, *present)`` that the exporters trace."""
    from torch import nn

    class KVCacheModule(nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            logits, present = self.inner.forward_cached(input_ids, attention_mask, position_ids, list(past))
            return (logits, *present)

    return KVCacheModule(module).eval()


def example_inputs(layout: dict[str, Any], seed: int = 0) -> tuple[Any, ...]:
    """Batch 2, 3 cached + 5 new tokens; row 1's first cached token is padding (mask 0)."""
    import torch

    b, t, p = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout["vocab_size"], (b, t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.int64)
    mask[1, 0] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, p:]
    shape = (b, layout["kv_heads"], p, layout["head_dim"])
    past = [torch.randn(shape, generator=g) for _ in range(2 * layout["layers"])]
    return (ids, mask, positions, *past)


@dataclass(frozen=True)
class FolderReport:
    """What ``export_kv_folder`` wrote."""

    folder: str
    files: tuple[str, ...]
    layout: dict[str, Any]
    export: ExportReport
    tokenizer: bool
    attention: str = "plain"
    """``group-query`` when every ``present`` comes from a GroupQueryAttention node, else ``plain``."""


def export_kv_folder(module: Any, out_dir: str | os.PathLike, tokenizer: Any = None, *,
                     dynamo: bool = False, check: bool = True, **options: Any) -> FolderReport:
    """Export ``module``'s cache path to ``out_dir`` (created; must not exist or be empty):
    ``model.onnx`` (+ external data), ``genai_config.json`` and, when ``tokenizer`` (a
    ``tokenizers.Tokenizer``) is given, ``tokenizer.json`` and ``tokenizer_config.json``.
    Written in a temporary folder beside ``out_dir`` and renamed into place.
    ``dynamo=False``: TorchScript exporter by default (dynamo takes minutes on real LLMs)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OxQuantError(f"{out} exists and is not an empty folder")
    if not out.parent.is_dir():
        raise OxQuantError(f"output directory {out.parent} does not exist")
    layout = cache_layout(module)
    wrapper = _wrapper(module)
    inputs = example_inputs(layout)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = export_model(wrapper, inputs, scratch / MODEL, input_names=input_names(layout["layers"]),
                              output_names=output_names(layout["layers"]), dynamo=dynamo, check=check, **options)
        if not report.check_passed:
            worst = min(report.check, key=lambda m: m.sqnr_db)
            raise OxQuantError(f"the cache export does not match PyTorch: {worst.name} SQNR {worst.sqnr_db:.1f} dB")
        shared = presents_share_buffers(scratch / MODEL, output_names(layout["layers"])[1:])
        (scratch / "genai_config.json").write_text(json.dumps(genai_config(layout, share_buffer=shared), indent=2) + "\n")
        if tokenizer is not None:
            write_tokenizer(tokenizer, scratch, layout)
        if out.exists():
            out.rmdir()
        os.replace(scratch, out)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    files = tuple(sorted(p.name for p in out.iterdir()))
    from dataclasses import replace

    attention = "group-query" if shared else "plain"
    return FolderReport(str(out), files, layout, replace(report, output=str(out / MODEL)), tokenizer is not None,
                        attention)


def write_tokenizer(tokenizer: Any, folder: Path, layout: dict[str, Any]) -> None:
    """``tokenizer.json`` (``tokenizers`` format) and a ``tokenizer_config.json`` naming the
    end / begin tokens (what ONNX Runtime GenAI's tokenizer reads beside it)."""
    tokenizer.save(str(folder / TOKENIZER))

    def token(key: str) -> str | None:
        index = layout.get(key)
        return None if index is None else tokenizer.id_to_token(int(index))

    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": layout["context_length"],
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        if token(name) is not None:
            config[key] = token(name)
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def spec_tokenizer(spec: str) -> Any:
    """The tokenizer of a model SPEC: a zero-argument ``tokenizer()`` beside its factory (in the
    factory's module), returning a ``tokenizers.Tokenizer``; None when there is none."""
    import inspect

    from ox_quant.export.spec import resolve_factory

    module = inspect.getmodule(resolve_factory(spec))
    make = getattr(module, "tokenizer", None)
    if not callable(make):
        return None
    try:
        return make()
    except Exception as exc:  # a zoo tokenizer needs its model package
        raise OxQuantError(f"building the tokenizer of {spec!r} failed: {type(exc).__name__}: {exc}") from exc


def export_kv_spec(spec: str, out_dir: str | os.PathLike, fused_attention: bool | None = None,
                   **options: Any) -> FolderReport:
    """``export_kv_folder`` on the module of a model SPEC, with its tokenizer when it has one.
    ``fused_attention`` (None: the module's default) sets the module's ``fused_attention``
    switch (the zoo's Llama: GroupQueryAttention or plain operators)."""
    from ox_quant.export.spec import load_spec

    module, _ = load_spec(spec)
    if fused_attention is not None:
        if not hasattr(module, "fused_attention"):
            raise OxQuantError(f"{type(module).__name__} has no fused_attention switch: its attention is exported "
                               "as its forward_cached writes it")
        module.fused_attention = fused_attention
    return export_kv_folder(module, out_dir, spec_tokenizer(spec), **options)
