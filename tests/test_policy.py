"""The default policy: which weight gets which config, its overrides, and --bits 3 never larger than --bits 4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import relative_error, run
from ox_quant.cli import main
from ox_quant.config import Block, Format, PerChannel, QuantConfig
from ox_quant.convert import ConvertOptions, convert
from ox_quant.errors import OxQuantError
from ox_quant.policy import UNIFORM, Policy

RNG = np.random.default_rng(7)
V, D, V2, C = 64, 64, 256, 4
IDS = np.array([[1, 5, 9, 63]], dtype=np.int64)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """ids, image -> Gather(emb) + Gather(tied) + pooled Conv(image) -> MatMul(up) -> MatMul(down)
    -> MatMul(., Transpose(tied)): one weight of every role (a tied table among them)."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e1"], name="embed"),
        helper.make_node("Gather", ["tied", "ids"], ["e2"], name="embed_tied"),
        helper.make_node("Conv", ["image", "conv.W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["p3"]),
        helper.make_node("Add", ["e1", "e2"], ["e"]),
        helper.make_node("Add", ["e", "p3"], ["h0"]),
        helper.make_node("MatMul", ["h0", "up"], ["h1"], name="up"),
        helper.make_node("MatMul", ["h1", "down"], ["h2"], name="down"),
        helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "tied_t"], ["logits"], name="lm_head"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in {
        "emb": w(V, D), "tied": w(V2, D), "conv.W": w(D, C, 3, 3), "up": w(D, 256), "down": w(256, D),
    }.items()] + [numpy_helper.from_array(np.array([1, 1, D], dtype=np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4]),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, V2])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    path = tmp_path_factory.mktemp("policy") / "m.onnx"
    import onnx

    onnx.save(m, str(path))
    return path


FEEDS = {"ids": IDS, "image": RNG.standard_normal((1, C, 8, 8)).astype(np.float32)}


def entries(report) -> dict[str, tuple[int, str, str]]:
    return {q.name: (q.bits, q.granularity, q.format) for q in report.quantized}


def runs_close(path: Path, reference: Path, limit: float = 0.4) -> float:
    """ORT runs ``path``; its relative error against the float model (4-bit MatMuls of random
    weights give about 0.15), held under ``limit``."""
    (out,) = run(path, FEEDS)
    (ref,) = run(reference, FEEDS)
    assert np.isfinite(out).all()
    error = relative_error(out, ref.astype(np.float64))
    assert error <= limit
    return error


def test_default_policy_gives_each_role_its_config(model, tmp_path):
    report = convert(model, tmp_path / "q.onnx", ConvertOptions(config=QuantConfig(granularity=Block(32))))
    got = entries(report)
    assert got["up"][:2] == got["down"][:2] == (4, "block")
    assert got["conv.W"] == (8, "channel", "qdq")
    assert got["emb"] == (8, "block", "gather_block_quantized")
    assert got["tied"][:2] == (8, "block")
    why = {q.name: q.config_reason for q in report.quantized}
    assert why["up"] == "--bits"
    assert why["conv.W"].startswith("default policy: Conv at int8")
    assert why["emb"].startswith("default policy: embeddings at int8") and why["tied"] == why["emb"]
    assert report.policy == ("MatMul/Gemm at int4 block:32 sym; Conv at int8 per output channel; "
                             "embeddings (Gather, tied tables) at int8 block:32")
    runs_close(tmp_path / "q.onnx", model)


def test_uniform_policy_applies_bits_everywhere_and_loses_more(model, tmp_path):
    config = QuantConfig(granularity=Block(32))
    report = convert(model, tmp_path / "u.onnx", ConvertOptions(config=config, policy=UNIFORM))
    assert {b for b, _, _ in entries(report).values()} == {4}
    convert(model, tmp_path / "d.onnx", ConvertOptions(config=config))
    assert runs_close(tmp_path / "d.onnx", model) < runs_close(tmp_path / "u.onnx", model)


def test_flags_override_the_policy_and_summary_says_why(model, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "32",
                          "--conv-bits", "4", "--embedding-bits", "4", "--json")
    assert code == 0
    report = json.loads(stdout)
    got = {q["name"]: (q["bits"], q["config_reason"]) for q in report["quantized"]}
    assert got["conv.W"] == (4, "--conv-bits")
    assert got["emb"] == (4, "--embedding-bits") and got["tied"] == (4, "--embedding-bits")
    runs_close(out, model)
    code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "32")
    assert code == 0
    assert ("default policy: MatMul/Gemm at int4 block:32 sym; Conv at int8 per output channel; "
            "embeddings (Gather, tied tables) at int8 block:32") in stdout
    assert "int8 channel x1 (Conv): default policy: Conv at int8 per output channel (--conv-bits)" in stdout


def test_recipe_rule_applies_on_top_of_the_policy(model, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"match": "conv", "bits": 4}, {"match": "^emb$", "format": "qdq"}]}))
    from ox_quant.selection import Selection, load_recipe

    options = ConvertOptions(config=QuantConfig(granularity=Block(32)), selection=Selection(rules=load_recipe(recipe)))
    report = convert(model, tmp_path / "q.onnx", options)
    got = entries(report)
    assert got["conv.W"] == (4, "channel", "qdq")  # the rule's bits, the Conv's per-channel scales
    assert got["emb"] == (8, "block", "qdq")  # the policy's bits, the rule's format
    assert {q.name: q.config_reason for q in report.quantized}["conv.W"] == "recipe rule 1"
    runs_close(tmp_path / "q.onnx", model)


@pytest.mark.parametrize("uniform", [False, True], ids=["policy", "uniform"])
def test_three_bits_never_larger_than_four_and_nothing_left_float(model, tmp_path, capsys, uniform):
    """--bits 3 writes no larger a file than --bits 4, with the same weights quantized (none left float);
    with --conv-bits/--embedding-bits 3 too, those weights are raised to 4 bits, not left float."""
    sizes, names = {}, {}
    for bits in (3, 4):
        out = tmp_path / f"q{bits}.onnx"
        extra = ["--conv-bits", str(bits), "--embedding-bits", str(bits)] if uniform else []
        code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--bits", str(bits),
                              "--block-size", "32", *extra, "--json")
        assert code == 0
        report = json.loads(stdout)
        sizes[bits] = report["output_bytes"]
        names[bits] = sorted(q["name"] for q in report["quantized"])
        if bits == 3 and uniform:
            raised = {q["name"]: q for q in report["quantized"] if q["bits"] == 4}
            assert sorted(raised) == ["conv.W", "emb", "tied"]
            assert all("int3 raised to int4" in q["config_reason"] for q in raised.values())
        runs_close(out, model, 0.5)
    assert names[3] == names[4] == ["conv.W", "down", "emb", "tied", "up"]
    assert sizes[3] <= sizes[4]


def test_no_raise_when_a_format_is_forced(model, tmp_path):
    """With --format qdq, a 3-bit request stays an error (one line), not a silent change of bits."""
    config = QuantConfig(bits=3, granularity=Block(32), format=Format.QDQ)
    with pytest.raises(OxQuantError, match="3"):
        convert(model, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))


def test_bad_policy_bits_are_one_line_errors(model, tmp_path, capsys):
    code, _, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "q.onnx"), "--conv-bits", "9")
    assert code == 1
    assert err.strip().splitlines() == ["ox-quant: error: --conv-bits: bits must be between 2 and 8, got 9"]
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(OxQuantError, match="--embedding-bits"):
        Policy(embedding_bits=1)


def test_embedding_blocks_fit_the_table(model, tmp_path):
    """--granularity channel sets MatMul/Gemm scales; tables keep blocks (GatherBlockQuantized needs them),
    128 by default, narrowed to the widest power of two that fits a narrower table (D = 64 here)."""
    report = convert(model, tmp_path / "q.onnx", ConvertOptions(config=QuantConfig(granularity=PerChannel())))
    got = {q.name: (q.bits, q.granularity, q.block_size) for q in report.quantized}
    assert got["up"][:2] == (4, "channel")
    assert got["emb"] == got["tied"] == (8, "block", 64)
    runs_close(tmp_path / "q.onnx", model)
