"""Key-value-cache export, ``generate``, ``bench``, folder ``convert`` and cached perplexity,
on the toy Llama (2 layers, 4 heads sharing 2 key-value heads, vocab 256, context 64)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch

from tests.helpers import run_cli
from tests.verify_support import assert_one_line_error


@pytest.fixture(scope="module")
def toy():
    from ox_quant_models import toy as zoo

    module, (ids,) = zoo.causal_lm()
    return module, ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ox_quant.export.kvcache import export_kv_spec

    out = tmp_path_factory.mktemp("kv") / "toy"
    report = export_kv_spec("toy-llama", out)
    return out, report


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    from ox_quant.export.kvcache import export_kv_spec

    out = tmp_path_factory.mktemp("kvplain") / "toy"
    assert export_kv_spec("toy-llama", out, fused_attention=False).attention == "plain"
    return out


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory):
    from ox_quant.core.config import QuantConfig, resolve_granularity
    from ox_quant.pipeline.convert import ConvertOptions
    from ox_quant.pipeline.folder import convert_folder

    out = tmp_path_factory.mktemp("kvq") / "toy-int4"
    report, copied = convert_folder(folder[0], out, ConvertOptions(config=QuantConfig(
        bits=4, granularity=resolve_granularity(None, 32))))
    assert report.quantized and copied == ["genai_config.json", "tokenizer.json", "tokenizer_config.json"]
    return out


def _decoder(path):
    from ox_quant.runtime.decode import CachedDecoder
    from ox_quant.runtime.llm_folder import read_folder

    return CachedDecoder(read_folder(path))


def _prefill_and_steps(path, ids: np.ndarray, prefill: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of a prefill of ``prefill`` tokens then one step per remaining token, and the cache."""
    decoder = _decoder(path)
    logits, cache = decoder.step(ids[:, :prefill], decoder.empty_cache(ids.shape[0]))
    parts = [logits]
    for i in range(prefill, ids.shape[1]):
        logits, cache = decoder.step(ids[:, i:i + 1], cache)
        parts.append(logits)
    return parts, cache.tensors


def test_folder_layout_axes_and_gqa(folder):
    path, report = folder
    assert sorted(p.name for p in path.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json",
                                                      "tokenizer_config.json"]
    graph = onnx.load(str(path / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["position_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 32]  # 2 kv heads < 4 heads
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert report.export.shape_check is not None
    assert set(report.export.shape_check.sizes) == {"batch", "sequence", "past_sequence"}
    assert min(m.sqnr_db for m in report.export.shape_check.metrics) > 60
    config = json.loads((path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention writes the cache in place


def test_cached_graph_is_compact(folder, plain_folder):
    """The decoder step is written for ONNX Runtime's per-node cost: each layer's attention is
    one GroupQueryAttention node (RoPE before it, no cache Concat), no per-layer shape
    arithmetic, constant reshape shapes; the plain export repeats no keys either."""
    from collections import Counter

    def ops(path):
        graph = onnx.load(str(path / "model.onnx")).graph
        return Counter(n.op_type for n in graph.node if n.op_type != "Constant"), graph

    fused, graph = ops(folder[0])
    assert fused["GroupQueryAttention"] == 2 and folder[1].attention == "group-query"
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert {producers[o.name] for o in graph.output[1:]} == {"GroupQueryAttention"}
    assert fused["Reshape"] == 2 * 2  # per layer: split the stacked heads for RoPE, merge them back
    assert fused["Shape"] <= 8 and fused["Expand"] <= 1  # the step's mask, positions and lengths, not per layer
    assert sum(fused.values()) <= 140, fused
    plain, _ = ops(plain_folder)
    assert plain["GroupQueryAttention"] == 0 and plain["Reshape"] == 4 * 2  # split, group queries, ungroup, merge
    assert plain["Expand"] <= 1 and plain["Shape"] <= 6
    assert sum(plain.values()) <= 46 * 2 + 60, plain  # the first layout exported 119 nodes per layer
    assert sum(plain.values()) > sum(fused.values())


def test_plain_attention_decodes_like_group_query_attention(folder, plain_folder, toy):
    """``--plain-attention``: the same model with separate past/present tensors (no shared
    buffers); its prefill and steps equal PyTorch and the GroupQueryAttention folder's."""
    module, ids = toy
    ids = torch.cat([ids, ids.flip(1)])[:, :12].numpy()
    assert not _decoder(plain_folder).shared and _decoder(folder[0]).shared
    assert json.loads((plain_folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    plain, plain_cache = _prefill_and_steps(plain_folder, ids, prefill=8)
    fused, fused_cache = _prefill_and_steps(folder[0], ids, prefill=8)
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.concatenate(plain, axis=1), expected, atol=1e-4 * scale, rtol=0)
    for a, b in zip(plain, fused, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)
    for a, b in zip(plain_cache, fused_cache, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max(), rtol=0)


def test_shared_buffers_are_written_in_place_and_grow(folder, plain_folder, monkeypatch):
    """A step that fits keeps the same buffers (the kernel wrote the new rows in place); one that
    does not gets buffers of twice what it needs, the cache copied over; logits as without sharing."""
    from ox_quant.runtime import decode

    monkeypatch.setattr(decode, "MIN_CAPACITY", 4)
    shared, plain = _decoder(folder[0]), _decoder(plain_folder)
    ids = np.array([[3, 4, 5]], dtype=np.int64)
    logits, cache = shared.step(ids, shared.empty_cache())
    ref, ref_cache = plain.step(ids, plain.empty_cache())
    assert cache.buffers is not None and cache.buffers.capacity == 6
    np.testing.assert_allclose(logits, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    seen = {id(cache.buffers)}
    for token in [7, 9, 11, 13]:  # lengths 4, 5, 6 fit in 6 rows; 7 does not
        before = cache.buffers
        logits, cache = shared.step(np.array([[token]], dtype=np.int64), cache)
        ref, ref_cache = plain.step(np.array([[token]], dtype=np.int64), ref_cache)
        np.testing.assert_allclose(logits, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
        assert (cache.buffers is before) == (cache.length <= 6)
        seen.add(id(cache.buffers))
    assert len(seen) == 2 and cache.buffers.capacity == 14
    for a, b in zip(cache.tensors, ref_cache.tensors, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_zero_token_step_keeps_the_cache(folder):
    decoder = _decoder(folder[0])
    logits, cache = decoder.step(np.array([[3, 4, 5]], dtype=np.int64), decoder.empty_cache())
    empty, same = decoder.step(np.zeros((1, 0), dtype=np.int64), cache)
    assert empty.shape == (1, 0, logits.shape[-1]) and same.length == cache.length
    for a, b in zip(same.tensors, cache.tensors, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefill_and_four_decode_steps_match_pytorch(folder, toy):
    module, ids = toy
    ids = torch.cat([ids, ids.flip(1)])[:, :12]  # batch 2
    parts, present = _prefill_and_steps(folder[0], ids.numpy(), prefill=8)
    assert len(parts) == 5
    with torch.no_grad():
        expected = module(ids).numpy()
        past = [torch.zeros(2, 2, 0, 32) for _ in range(4)]
        _, ref_present = module.forward_cached(ids, torch.ones(2, 12, dtype=torch.int64),
                                               torch.arange(12).expand(2, 12), past)
    got = np.concatenate(parts, axis=1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale, rtol=0)
    for g, r in zip(present, ref_present, strict=True):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4 * np.abs(r.numpy()).max(), rtol=0)


def test_quantized_cache_decoding_matches_its_full_sequence_run(quantized, toy):
    _, ids = toy
    parts, _ = _prefill_and_steps(quantized, ids.numpy(), prefill=8)
    full, _ = _prefill_and_steps(quantized, ids.numpy(), prefill=ids.shape[1])
    got = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(got, full[0], atol=1e-4 * np.abs(full[0]).max(), rtol=0)
    graph = onnx.load(str(quantized / "model.onnx")).graph
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    assert not any(i.name.startswith("past_key_values") for i in graph.initializer)  # the cache is no weight


def test_greedy_tokens_equal_pytorch(folder, toy, capsys):
    module, _ = toy
    prompt = "The cat"
    code, out, err = run_cli(capsys, "generate", str(folder[0]), "--prompt", prompt, "--max-new-tokens", "10",
                             "--greedy", "--ids")
    assert code == 0, err
    got = [int(t) for t in out.split()]
    ids = list(prompt.encode())
    expected = []
    with torch.no_grad():
        for _ in range(10):
            token = int(module(torch.tensor([ids + expected]))[0, -1].argmax())
            expected.append(token)
            if token == 0:  # the toy's end token
                break
    assert got == expected


def test_generate_on_quantized_model_streams_text(quantized, capsys):
    code, out, err = run_cli(capsys, "generate", str(quantized), "--prompt", "Hello", "--max-new-tokens", "6",
                             "--temperature", "0.7", "--top-k", "5", "--seed", "3")
    assert code == 0, err
    assert out.endswith("\n") and len(out.rstrip("\n").encode()) <= 6 * 4


def test_bench_json_fields(folder, tmp_path, capsys):
    from ox_quant.export.exporter import export_spec

    mlp = tmp_path / "mlp.onnx"
    export_spec("toy-mlp", mlp)
    args = ["--prompt-len", "8", "--gen", "4", "--repeats", "2", "--threads", "1"]
    code, out, err = run_cli(capsys, "bench", str(folder[0]), *args, "--json")
    assert code == 0, err
    single = json.loads(out)
    assert single["kind"] == "llm"
    assert single["prefill_ms"] > 0 and single["decode_tokens_per_s"] > 0
    assert single["peak_rss_mib"] >= single["rss_before_load_mib"] > 0
    code, out, err = run_cli(capsys, "bench", str(folder[0]), "--compare", str(mlp), *args, "--json")
    assert code == 0, err
    models = json.loads(out)["models"]
    assert [m["kind"] for m in models] == ["llm", "onnx"]
    assert models[1]["latency_ms"] > 0 and models[1]["shapes"] == {"x": [1, 128]}
    assert set(models[1]["ratios"]) == {"peak_rss_mib"}


def test_cached_perplexity_equals_full_sequence(folder):
    """The perplexity task's scoring (windows, NLL) on logits from token-by-token decoding
    through the cache (what ``eval`` does with a folder) and from one full-sequence run."""
    from ox_quant.evaluation.tasks import CachedRunner, runner_for
    from ox_quant_models.tasks.perplexity import window_nll, windows

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    batches = windows([list(text.encode())], context=40)
    incremental = runner_for(folder[0], lambda: None, ["input_ids"])
    assert isinstance(incremental, CachedRunner) and incremental.chunk == 1
    full = CachedRunner(folder[0], chunk=64)

    def perplexity(runner) -> float:
        scored = [window_nll(runner({"input_ids": ids})[0], ids) for ids in batches]
        return math.exp(sum(n for n, _ in scored) / sum(c for _, c in scored))

    a, b = perplexity(incremental), perplexity(full)
    assert a == pytest.approx(b, rel=1e-4)
    assert math.isfinite(a) and a > 1


def test_three_error_paths(folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert_one_line_error(code, err, "not a key-value-cache LLM folder")
    code, _, err = run_cli(capsys, "export", "toy-mlp", "--kv-cache", "-o", str(tmp_path / "mlp"))
    assert_one_line_error(code, err, "has no key-value cache path")
    assert not (tmp_path / "mlp").exists()
    code, _, err = run_cli(capsys, "generate", str(folder[0]), "--prompt", "x" * 64)
    assert_one_line_error(code, err, "the model's context is 64 tokens")
    bare = tmp_path / "bare"
    shutil.copytree(folder[0], bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "generate", str(bare), "--prompt", "x")
    assert_one_line_error(code, err, "has no tokenizer.json")


def test_onnxruntime_genai_loads_the_folder_and_generates_the_same_greedy_tokens(folder, capsys):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional extra genai)")
    prompt = "The cat"
    code, out, err = run_cli(capsys, "generate", str(folder[0]), "--prompt", prompt, "--max-new-tokens", "8", "--ids")
    assert code == 0, err
    ours = [int(t) for t in out.split()]
    model = og.Model(str(folder[0]))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    assert list(ids) == list(prompt.encode())
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours
