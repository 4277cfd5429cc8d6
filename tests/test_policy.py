"""The default policy: which weight gets which config, its overrides, and --bits 3 never larger than --bits 4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.cli import main
from ox_quant.core.config import Block, Format, PerChannel, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.pipeline.convert import ConvertOptions, convert
from ox_quant.pipeline.policy import UNIFORM, Policy
from tests.helpers import relative_error, run

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
    assert sorted(got) == ["down", "up"]
    assert got["up"][:2] == got["down"][:2] == (4, "block")
    assert {q.config_reason for q in report.quantized} == {"--bits"}
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["conv.W"] == "Conv weights left float by the default policy (--conv-bits 8 quantizes it)"
    assert skipped["emb"] == skipped["tied"] == "embedding table left float by the default policy (--embedding-bits 8 quantizes it)"
    assert report.policy == ("MatMul at int4 block:32 asym; Gemm float (--gemm-bits); Conv float (--conv-bits); "
                             "embeddings (Gather, tied tables) float (--embedding-bits)")
    runs_close(tmp_path / "q.onnx", model)


def test_int8_policy_and_uniform(model, tmp_path):
    """--conv-bits/--embedding-bits 8: Conv per output channel, tables in blocks; UNIFORM: all at --bits.
    4-bit Conv and tables add error that int8 ones do not (int8 is within a few percent of float)."""
    config = QuantConfig(granularity=Block(32))
    report = convert(model, tmp_path / "e.onnx", ConvertOptions(config=config, policy=Policy(conv_bits=8, embedding_bits=8)))
    got = entries(report)
    assert got["conv.W"] == (8, "channel", "qdq")
    assert got["emb"] == (8, "block", "gather_block_quantized")
    assert got["tied"][:2] == (8, "block")
    assert {q.name: q.config_reason for q in report.quantized}["conv.W"] == "default policy (--conv-bits)"
    report = convert(model, tmp_path / "u.onnx", ConvertOptions(config=config, policy=UNIFORM))
    assert {b for b, _, _ in entries(report).values()} == {4} and len(report.quantized) == 5
    convert(model, tmp_path / "d.onnx", ConvertOptions(config=config))
    errors = [runs_close(tmp_path / f"{name}.onnx", model) for name in ("d", "e", "u")]
    assert max(errors[:2]) < errors[2]
    assert abs(errors[1] - errors[0]) <= 0.05 * errors[0]


def test_flags_override_the_policy_and_summary_says_why(model, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "32",
                          "--conv-bits", "4", "--embedding-bits", "bits", "--json")
    assert code == 0
    report = json.loads(stdout)
    got = {q["name"]: (q["bits"], q["config_reason"]) for q in report["quantized"]}
    assert got["conv.W"] == (4, "--conv-bits")
    assert got["emb"] == got["tied"] == (4, "--bits")
    runs_close(out, model)
    code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "32", "--conv-bits", "8")
    assert code == 0
    assert ("default policy: MatMul at int4 block:32 asym; Gemm float (--gemm-bits); Conv int8 per output channel (--conv-bits); "
            "embeddings (Gather, tied tables) float (--embedding-bits)") in stdout
    assert "int8 channel x1 (Conv): --conv-bits" in stdout
    assert "2  embedding table left float by the default policy (--embedding-bits 8 quantizes it): emb, tied" in stdout


def test_recipe_rule_applies_on_top_of_the_policy(model, tmp_path):
    """A rule's bits quantize a Conv the policy leaves float; a rule without bits takes --bits for a
    table the policy leaves float, and the policy's int8 for one it quantizes."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"match": "conv", "bits": 8}, {"match": "^emb$", "format": "qdq"}]}))
    from ox_quant.pipeline.selection import Selection, load_recipe

    selection = Selection(rules=load_recipe(recipe))
    config = QuantConfig(granularity=Block(32))
    report = convert(model, tmp_path / "q.onnx", ConvertOptions(config=config, selection=selection))
    got = entries(report)
    assert got["conv.W"] == (8, "channel", "qdq")  # the rule's bits, the Conv's per-channel scales
    assert got["emb"] == (4, "block", "qdq")  # --bits, the rule's format
    assert "tied" not in got  # no rule: the policy leaves it float
    assert {q.name: q.config_reason for q in report.quantized}["conv.W"] == "recipe rule 1"
    runs_close(tmp_path / "q.onnx", model)
    report = convert(model, tmp_path / "q.onnx",
                     ConvertOptions(config=config, selection=selection, policy=Policy(embedding_bits=8)))
    assert entries(report)["emb"] == (8, "block", "qdq")
    runs_close(tmp_path / "q.onnx", model)


@pytest.mark.parametrize("extra", [(), ("--conv-bits", "8", "--embedding-bits", "8"), ("--conv-bits", "bits", "--embedding-bits", "bits")],
                         ids=["default", "int8", "uniform"])
def test_three_bits_never_larger_than_four_and_nothing_left_float(model, tmp_path, capsys, extra):
    """--bits 3 writes no larger a file than --bits 4, with the same weights quantized (none left float
    that --bits 4 quantizes); Conv and tables asked at 3 bits are raised to 4, not left float."""
    sizes, names = {}, {}
    for bits in (3, 4):
        out = tmp_path / f"q{bits}.onnx"
        code, stdout, _ = cli(capsys, "convert", str(model), "-o", str(out), "--bits", str(bits),
                              "--block-size", "32", *extra, "--json")
        assert code == 0
        report = json.loads(stdout)
        sizes[bits] = report["output_bytes"]
        names[bits] = sorted(q["name"] for q in report["quantized"])
        if bits == 3 and "bits" in extra:
            raised = {q["name"]: q for q in report["quantized"] if q["bits"] == 4}
            assert sorted(raised) == ["conv.W", "emb", "tied"]
            assert all("int3 raised to int4" in q["config_reason"] for q in raised.values())
        runs_close(out, model, 0.5)
    assert names[3] == names[4] == (["down", "up"] if not extra else ["conv.W", "down", "emb", "tied", "up"])
    assert sizes[3] <= sizes[4]


def test_no_raise_when_a_format_is_forced(model, tmp_path):
    """With --format qdq, a 3-bit request stays an error (one line), not a silent change of bits."""
    config = QuantConfig(bits=3, granularity=Block(32), format=Format.QDQ)
    with pytest.raises(OxQuantError, match="3"):
        convert(model, tmp_path / "q.onnx", ConvertOptions(config=config, policy=UNIFORM))


def test_bad_policy_bits_are_one_line_errors(model, tmp_path, capsys):
    for value, message in (("9", "--conv-bits: bits must be between 2 and 8, got 9"),
                           ("half", "--conv-bits 'half': expected float, bits, or 2 to 8")):
        code, _, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "q.onnx"), "--conv-bits", value)
        assert code == 1
        assert err.strip().splitlines() == [f"ox-quant: error: {message}"]
        assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(OxQuantError, match="--embedding-bits"):
        Policy(embedding_bits=1)


def test_embedding_blocks_fit_the_table(model, tmp_path):
    """--granularity channel sets MatMul/Gemm scales; tables keep blocks (GatherBlockQuantized needs them),
    128 by default, narrowed to the widest power of two that fits a narrower table (D = 64 here)."""
    report = convert(model, tmp_path / "q.onnx",
                     ConvertOptions(config=QuantConfig(granularity=PerChannel()), policy=Policy(embedding_bits=8)))
    got = {q.name: (q.bits, q.granularity, q.block_size) for q in report.quantized}
    assert got["up"][:2] == (4, "channel")
    assert got["emb"] == got["tied"] == (8, "block", 64)
    runs_close(tmp_path / "q.onnx", model)


@pytest.fixture(scope="module")
def gemm_model(tmp_path_factory) -> Path:
    """x[2, 64] -> Gemm(W1, transB=1) -> Relu -> MatMul(W2) -> y: a Gemm and a MatMul weight."""
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1, name="fc"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="head"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in {"W1": w(128, 64), "b1": w(128), "W2": w(128, 32)}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    path = tmp_path_factory.mktemp("gemm") / "g.onnx"
    import onnx

    onnx.save(m, str(path))
    return path


def test_gemm_weights_stay_float_by_default_and_gemm_bits_quantizes_them(gemm_model, tmp_path, capsys):
    """ONNX Runtime's quantizer leaves Gemm weights float (CREPE's Gemm head loses pitch accuracy
    when quantized, docs/defaults.md); --gemm-bits bits gives them the MatMul config."""
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    (ref,) = run(gemm_model, feeds)
    report = convert(gemm_model, tmp_path / "d.onnx", ConvertOptions(config=QuantConfig(granularity=Block(32))))
    assert sorted(entries(report)) == ["W2"]
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["W1"] == "Gemm weight left float by the default policy (--gemm-bits bits quantizes it)"
    code, out, _ = cli(capsys, "convert", str(gemm_model), "-o", str(tmp_path / "g.onnx"), "--block-size", "32",
                       "--gemm-bits", "bits", "--json")
    assert code == 0
    got = {q["name"]: q for q in json.loads(out)["quantized"]}
    assert sorted(got) == ["W1", "W2"]
    assert got["W1"]["bits"] == 4 and got["W1"]["granularity"] == got["W2"]["granularity"]
    assert got["W1"]["config_reason"] == "--bits"
    (out8,) = run(tmp_path / "g.onnx", feeds)
    assert relative_error(out8, ref.astype(np.float64)) < 0.3
    code, out, _ = cli(capsys, "convert", str(gemm_model), "-o", str(tmp_path / "g8.onnx"), "--gemm-bits", "8",
                       "--block-size", "32", "--json")
    assert code == 0
    assert {q["name"]: (q["bits"], q["config_reason"]) for q in json.loads(out)["quantized"]} == {
        "W1": (8, "--gemm-bits"), "W2": (4, "--bits")}
    code, _, err = cli(capsys, "convert", str(gemm_model), "-o", str(tmp_path / "bad.onnx"), "--gemm-bits", "nine")
    assert code == 1 and "--gemm-bits 'nine'" in err and not (tmp_path / "bad.onnx").exists()
