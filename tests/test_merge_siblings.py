"""Sibling MatMulNBits merged into one node (``ox_quant.ir.merge_siblings``): the merged model
gives ONNX Runtime's exact outputs of the unmerged one, a joining Concat goes away, other
outputs come back through a Split, and nodes that differ stay apart with the reason."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import run, run_cli

K = 64


def _block_model(path, rng, opset: int = 17) -> None:
    """``x, y [B, T, K]``: q/k/v MatMuls of x joined by a Concat (as a decoder's attention reads
    them), gate/up MatMuls of y multiplied (SwiGLU without the activation; up also an output),
    and one MatMul of a third input z."""
    w = {n: rng.standard_normal((K, size)).astype(np.float32) * 0.1
         for n, size in [("q", 32), ("k", 16), ("v", 16), ("gate", 48), ("up", 48), ("other", 8)]}
    reads = {"q": "x", "k": "x", "v": "x", "gate": "y", "up": "y", "other": "z"}
    nodes = [helper.make_node("MatMul", [reads[n], n], [f"{n}_out"], name=f"{n}_mm") for n in w]
    nodes += [helper.make_node("Concat", ["q_out", "k_out", "v_out"], ["qkv_cat"], axis=-1, name="qkv_concat"),
              helper.make_node("Relu", ["qkv_cat"], ["qkv"], name="after_concat"),
              helper.make_node("Mul", ["gate_out", "up_out"], ["mlp"], name="swiglu")]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", K]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "t", 64]),
         helper.make_tensor_value_info("mlp", TensorProto.FLOAT, ["b", "t", 48]),
         helper.make_tensor_value_info("other_out", TensorProto.FLOAT, ["b", 8]),
         helper.make_tensor_value_info("up_out", TensorProto.FLOAT, ["b", "t", 48])],
        [numpy_helper.from_array(v, n) for n, v in w.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))


@pytest.mark.parametrize("accuracy", [None, 4])
def test_merged_model_equals_unmerged_on_onnxruntime(tmp_path, capsys, accuracy):
    rng = np.random.default_rng(0)
    src = tmp_path / "block.onnx"
    _block_model(src, rng)
    extra = [] if accuracy is None else ["--accuracy-level", str(accuracy)]
    for name, flag in (("apart", "--no-merge-siblings"), ("merged", "--merge-siblings")):
        code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / f"{name}.onnx"), "--block-size", "32",
                                 flag, "--json", *extra)
        assert code == 0, err
        if name == "merged":
            groups = json.loads(out)["merged_siblings"]
    assert sorted((g["n"], g["concat_removed"]) for g in groups) == [([32, 16, 16], True), ([48, 48], False)]
    apart = Counter(n.op_type for n in onnx.load(str(tmp_path / "apart.onnx")).graph.node)
    merged = Counter(n.op_type for n in onnx.load(str(tmp_path / "merged.onnx")).graph.node)
    assert apart["MatMulNBits"] == 6 and merged["MatMulNBits"] == 3 and merged["Split"] == 1
    assert apart["Concat"] == 1 and merged["Concat"] == 0
    feeds = {"x": rng.standard_normal((2, 5, K)).astype(np.float32),
             "y": rng.standard_normal((2, 5, K)).astype(np.float32), "z": rng.standard_normal((3, K)).astype(np.float32)}
    for a, m in zip(run(tmp_path / "apart.onnx", feeds), run(tmp_path / "merged.onnx", feeds), strict=True):
        np.testing.assert_array_equal(m, a)  # same bytes per output column: the same numbers


def test_file_default_is_apart_and_the_summary_says_when_merged(tmp_path, capsys):
    src = tmp_path / "block.onnx"
    _block_model(src, np.random.default_rng(1))
    code, out, _ = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "d.onnx"), "--block-size", "32")
    assert code == 0 and "merged" not in out
    assert Counter(n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node)["MatMulNBits"] == 6
    code, out, _ = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "m.onnx"), "--block-size", "32",
                           "--merge-siblings")
    assert code == 0 and "merged 2 groups of sibling MatMulNBits (3 fewer kernels" in out


def test_siblings_that_differ_stay_apart_with_the_reason(tmp_path, capsys):
    from ox_quant.ir.merge_siblings import sibling_groups, why_not_siblings

    src = tmp_path / "block.onnx"
    _block_model(src, np.random.default_rng(2))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"match": "^k$", "block_size": 16}]}))
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "r.onnx"), "--block-size", "32",
                           "--recipe", str(recipe), "--no-merge-siblings")
    assert code == 0, err
    model = ir.load(str(tmp_path / "r.onnx"))
    nodes = {n.name: n for n in model.graph if n.op_type == "MatMulNBits"}
    q, k, v = (next(n for name, n in nodes.items() if name.startswith(p)) for p in ("q_mm", "k_mm", "v_mm"))
    other = next(n for name, n in nodes.items() if name.startswith("other_mm"))
    assert why_not_siblings(q, v) is None
    assert "block_size differ (32 vs 16)" in (why_not_siblings(q, k) or "")
    assert why_not_siblings(q, other) == "they read different inputs"
    groups = [sorted(n.name for n in g) for g in sibling_groups(model.graph)]
    assert any(len(g) == 2 and g[0].startswith("q_mm") and g[1].startswith("v_mm") for g in groups)


def test_llm_folder_merges_by_default_and_decodes_the_same(tmp_path, capsys):
    from ox_quant.export.kvcache import export_kv_spec
    from ox_quant.runtime.decode import CachedDecoder
    from ox_quant.runtime.llm_folder import read_folder

    export_kv_spec("toy-llama", tmp_path / "toy")
    for name, flags in (("merged", []), ("apart", ["--no-merge-siblings"])):
        code, _, err = run_cli(capsys, "convert", str(tmp_path / "toy"), "-o", str(tmp_path / name),
                               "--block-size", "32", *flags)
        assert code == 0, err
    ops = {name: Counter(n.op_type for n in onnx.load(str(tmp_path / name / "model.onnx")).graph.node)
           for name in ("merged", "apart")}
    layers = 2
    assert ops["apart"]["MatMulNBits"] - ops["merged"]["MatMulNBits"] == 3 * layers  # q/k/v -> 1, gate/up -> 1
    ids = np.array([[5, 9, 200, 17, 3, 3, 41]], dtype=np.int64)
    outs = []
    for name in ("merged", "apart"):
        decoder = CachedDecoder(read_folder(tmp_path / name))
        logits, cache = decoder.step(ids, decoder.empty_cache())
        step, _ = decoder.step(ids[:, :1], cache)
        outs.append((logits, step))
    for m, a in zip(*outs, strict=True):
        np.testing.assert_array_equal(m, a)
