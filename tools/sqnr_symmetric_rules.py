"""Output SQNR of ox-quant's symmetric rules against ONNX Runtime's symmetric quantizer.

For each real model: the fp32 ONNX (as the studies export it), ONNX Runtime's
``MatMulNBitsQuantizer`` (default RTN, ``is_symmetric=True``, MatMul weights) and ox-quant
with each ``--symmetric-rule`` on the same MatMul weights (``--include-op MatMul``, so both
quantize the same weights where both can), int4, blocks of 128 and 32. SQNR =
``10 log10(sum(ref^2) / sum((ref - out)^2))`` of the model outputs against fp32, on the
model's task inputs (MiniLM: the 24 sentences; CREPE: the synthetic tones; PP-OCR: the 8
rendered lines and 23 more from a public-domain passage; SmolLM2: its first 96 tokens). A model
with no MatMul weight (CREPE: Conv and Gemm) gets ox-quant's default ops instead, and the
peer column says it quantized nothing. Run by hand:

    python tools/sqnr_symmetric_rules.py --models minilm,crepe-tiny,ppocr-rec,smollm2 --work WORKDIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his "
    "lady to him one day, have you heard that Netherfield Park is let at last?"
)


def passage_lines(width: int = 24) -> list[str]:
    """:data:`PASSAGE` cut into lines of at most ``width`` characters (more OCR inputs)."""
    lines, current = [], ""
    for word in PASSAGE.split():
        if current and len(current) + len(word) >= width:
            lines.append(current)
            current = ""
        current = f"{current} {word}".strip()
    return lines + [current]


def task_inputs(model: str) -> list[dict[str, np.ndarray]]:
    """One or more feed dicts of the model's task inputs."""
    if model == "minilm":
        from ox_quant_models import minilm
        from ox_quant_models.tasks.sentences import sentences

        feeds = minilm.encode(sentences())
        return [{k: feeds[k] for k in minilm.INPUT_NAMES}]
    if model == "crepe-tiny":
        from ox_quant_models.tasks.pitch import tones

        return [{"frames": tones()[0]}]
    if model == "ppocr-rec":
        from ox_quant_models.tasks.ocr import LINES, preprocess, render

        return [{"x": preprocess(render(line))} for line in (*LINES, *passage_lines())]
    if model == "smollm2":
        from ox_quant_models import smollm2

        ids = smollm2.tokenizer().encode(PASSAGE).ids[:96]
        return [{"input_ids": np.array([ids], dtype=np.int64)}]
    raise SystemExit(f"unknown model {model!r}")


def outputs(path: Path, feeds_list: list[dict[str, np.ndarray]]) -> np.ndarray:
    from ox_quant.runtime.session import make_session

    session = make_session(path)
    names = [i.name for i in session.get_inputs()]
    flat = []
    for feeds in feeds_list:
        if len(names) == 1 and len(feeds) == 1:
            feeds = {names[0]: next(iter(feeds.values()))}
        flat += [np.asarray(o, dtype=np.float64).ravel() for o in session.run(None, feeds)]
    return np.concatenate(flat)


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def quantized_bytes(path: Path) -> tuple[int, int]:
    """(number of MatMulNBits nodes, bytes of their B/scales/zero-point initializers)."""
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: len(t.raw_data) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    return len(nodes), sum(inits.get(name, 0) for n in nodes for name in n.input[1:4] if name)


def main() -> int:
    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,crepe-tiny,ppocr-rec")
    parser.add_argument("--blocks", default="128,32")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    from ox_quant.core.config import Block, Format, QuantConfig, SymmetricRule
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.pipeline.selection import Selection
    from ox_quant.study.peer import quantize_with_peer
    from ox_quant_models.tasks import study_facts

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| model | block | ORT symmetric | " + " | ".join(f"ox-quant {r.value}" for r in SymmetricRule)
          + " | weights quantized (ORT / ox-quant) | bytes (ORT / ox-quant) |")
    print("|---|---|---|" + "---|" * len(SymmetricRule) + "---|---|")
    for model in args.models.split(","):
        fp32 = args.work / f"{model}.fp32.onnx"
        if not fp32.exists():
            study_facts(model).export(fp32)
        feeds = task_inputs(model)
        ref = outputs(fp32, feeds)
        for bs in (int(b) for b in args.blocks.split(",")):
            peer = args.work / f"{model}.ort.b{bs}.onnx"
            quantize_with_peer(fp32, peer, {"bits": 4, "block_size": bs, "is_symmetric": True, "quant_format": "QOperator"})
            row = {"model": model, "block": bs, "ort": sqnr(ref, outputs(peer, feeds)), "ort_nodes_bytes": quantized_bytes(peer)}
            selection = Selection(include_ops=("MatMul",)) if row["ort_nodes_bytes"][0] else Selection()
            row["ox_quant_ops"] = list(selection.include_ops)
            for rule in SymmetricRule:
                out = args.work / f"{model}.{rule.value}.b{bs}.onnx"
                fmt = Format.MATMULNBITS if row["ort_nodes_bytes"][0] else Format.AUTO
                config = QuantConfig(bits=4, granularity=Block(bs), format=fmt, symmetric_rule=rule)
                report = convert(fp32, out, ConvertOptions(config=config, selection=selection))
                row[rule.value] = sqnr(ref, outputs(out, feeds))
                row["ours_nodes_bytes"] = (len(report.quantized), sum(q.stored_bytes for q in report.quantized))
                out.unlink()
                data = out.with_name(out.name + ".data")
                if data.exists():
                    data.unlink()
            peer.unlink()
            rows.append(row)
            (on, ob), (un, ub) = row["ort_nodes_bytes"], row["ours_nodes_bytes"]
            print(f"| {model} | {bs} | {row['ort']:.2f} | " + " | ".join(f"{row[r.value]:.2f}" for r in SymmetricRule)
                  + f" | {on} / {un} | {ob} / {ub} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
