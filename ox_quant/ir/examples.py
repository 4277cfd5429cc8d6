"""A built-in example model: LLM-shaped MatMul blocks with seeded random weights.

Used by ``ox-quant demo`` (the embedded default: no download, no model package) and by
``tools/bench_convert.py`` at LLM size. Each layer is

    h = x + (x@Wq + x@Wk + x@Wv) @ Wo
    y = h + (silu(h@Wgate) * (h@Wup)) @ Wdown

with ``Wq, Wk, Wv, Wo: [hidden, hidden]``, ``Wgate, Wup: [hidden, mlp]``,
``Wdown: [mlp, hidden]``, weights ~ N(0, 1/K).

With ``vocab``, the model reads ``input_ids[batch, seq]`` through an embedding table
``embed.weight[vocab, hidden]`` and writes ``logits[batch, seq, vocab]``: through
``MatMul(y, Transpose(embed.weight))`` when ``tied`` (Llama/GPT-2 style), else through
its own ``lm_head.weight[hidden, vocab]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llm_shaped_model(
    path: Path,
    layers: int = 2,
    hidden: int = 256,
    mlp: int = 688,
    seed: int = 0,
    external: bool = False,
    vocab: int | None = None,
    tied: bool = False,
) -> int:
    """Write the example model to ``path``; return its weight bytes (MatMul and embedding)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    if vocab is not None:
        embed = (rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(1.0 / np.sqrt(hidden))).astype(np.float32)
        inits.append(numpy_helper.from_array(embed, "embed.weight"))
        nodes.append(helper.make_node("Gather", ["embed.weight", "input_ids"], ["x"], name="embed_tokens"))
    for i in range(layers):
        p = f"layer{i}."

        def weight(name: str, k: int, n: int, p: str = p) -> str:
            w = (rng.standard_normal((k, n), dtype=np.float32) * np.float32(1.0 / np.sqrt(k))).astype(np.float32)
            inits.append(numpy_helper.from_array(w, p + name + ".weight"))
            return p + name + ".weight"

        for proj in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [x, weight(proj, hidden, hidden)], [p + proj], name=p + proj + "_proj"))
        nodes.append(helper.make_node("Sum", [p + "q", p + "k", p + "v"], [p + "qkv"]))
        nodes.append(helper.make_node("MatMul", [p + "qkv", weight("o", hidden, hidden)], [p + "attn"], name=p + "o_proj"))
        nodes.append(helper.make_node("Add", [x, p + "attn"], [p + "h"]))
        nodes.append(helper.make_node("MatMul", [p + "h", weight("gate", hidden, mlp)], [p + "gate"], name=p + "gate_proj"))
        nodes.append(helper.make_node("MatMul", [p + "h", weight("up", hidden, mlp)], [p + "up"], name=p + "up_proj"))
        nodes.append(helper.make_node("Sigmoid", [p + "gate"], [p + "sig"]))
        nodes.append(helper.make_node("Mul", [p + "gate", p + "sig"], [p + "silu"]))
        nodes.append(helper.make_node("Mul", [p + "silu", p + "up"], [p + "act"]))
        nodes.append(helper.make_node("MatMul", [p + "act", weight("down", mlp, hidden)], [p + "down"], name=p + "down_proj"))
        out = "y" if i == layers - 1 else p + "out"
        nodes.append(helper.make_node("Add", [p + "h", p + "down"], [out]))
        x = out
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])]
    if vocab is not None:
        if tied:
            nodes.append(helper.make_node("Transpose", ["embed.weight"], ["embed.weight_t"], perm=[1, 0]))
            head = "embed.weight_t"
        else:
            w = (rng.standard_normal((hidden, vocab), dtype=np.float32) * np.float32(1.0 / np.sqrt(hidden))).astype(np.float32)
            inits.append(numpy_helper.from_array(w, "lm_head.weight"))
            head = "lm_head.weight"
        nodes.append(helper.make_node("MatMul", ["y", head], ["logits"], name="lm_head"))
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    graph = helper.make_graph(nodes, "llm_shaped", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return sum(int(np.prod(t.dims)) * 4 for t in inits)
