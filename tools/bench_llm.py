#!/usr/bin/env python3
"""Benchmark: inference latency of ox-quant's default output against float and against
ONNX Runtime's ``MatMulNBitsQuantizer``, on LLM-shaped models, ONNX Runtime CPU.

Builds two float32 models with seeded weights (``ox_quant.ir.examples.llm_shaped_model``:
``input_ids -> embedding -> L x (q/k/v/o, gate/up/down MatMuls) -> logits``, no KV
cache), one with a tied embedding (logits through ``Transpose(embed.weight)``) and one
with its own ``lm_head``. Each is converted by

* ox-quant's default: ``ox-quant convert M --block-size 128``
* ONNX Runtime's command line (``ort``): ``python -m onnxruntime.quantization.matmul_nbits_quantizer
  --input_model M --output_model O --block_size 128 --bits 4`` (its other defaults: symmetric)
* ONNX Runtime's class default (``ort-class``): ``MatMulNBitsQuantizer(model, bits=4)`` (block 128,
  asymmetric: the same codes as ox-quant's default), saved with external data as its script saves

and the four models are timed in the same process, with the same ONNX Runtime session
options (default graph optimisations, ``--threads`` intra-op threads, 1 inter-op), the
runs interleaved so that machine load falls on all of them alike:

* token: one step at batch 1 (``input_ids[1, 1]``; without a KV cache a step reads 1 token);
* prompt: ``input_ids[1, --prompt]``.

Prints the median, the interquartile range (25th-75th percentile) and the minimum of each,
the ratios of medians to float and to ONNX Runtime's output, the file sizes, and the logits' SQNR against float
on the prompt.

    python tools/bench_llm.py --workdir /tmp/oxq-llm --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def build(path: Path, args: argparse.Namespace, tied: bool) -> None:
    from ox_quant.ir.examples import llm_shaped_model

    llm_shaped_model(path, layers=args.layers, hidden=args.hidden, mlp=args.mlp, seed=args.seed,
                     vocab=args.vocab, tied=tied)


def run_tool(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_runs(sessions: dict[str, Any], feed: dict[str, np.ndarray], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each session, runs interleaved (one of each per round)."""
    for _ in range(warmup):
        for sess in sessions.values():
            sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return times


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = np.sum((ref - got.astype(np.float64)) ** 2)
    return float(10 * np.log10(np.sum(ref**2) / noise)) if noise else float("inf")


def stats(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "q25_ms": float(np.percentile(ms, 25)), "q75_ms": float(np.percentile(ms, 75)),
            "min_ms": float(ms.min())}


ORT_CLASS_DEFAULT = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(onnx.load(sys.argv[1]), bits=4)
q.process()
q.model.save_model_to_file(sys.argv[2], True)
"""


def bench_model(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    work = args.workdir / kind
    work.mkdir(parents=True, exist_ok=True)
    src = work / "float.onnx"
    build(src, args, tied=kind == "tied")
    paths = {"float": src, "ox-quant": work / "oxq.onnx", "ort": work / "ort.onnx", "ort-class": work / "ort_class.onnx"}
    run_tool([sys.executable, "-m", "ox_quant.cli", "convert", str(src), "-o", str(paths["ox-quant"]), "--block-size", "128"])
    run_tool([sys.executable, "-m", "onnxruntime.quantization.matmul_nbits_quantizer", "--input_model", str(src),
              "--output_model", str(paths["ort"]), "--block_size", "128", "--bits", "4"])
    run_tool([sys.executable, "-c", ORT_CLASS_DEFAULT, str(src), str(paths["ort-class"])])
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    rng = np.random.default_rng(args.seed)
    token = {"input_ids": rng.integers(0, args.vocab, (1, 1), dtype=np.int64)}
    prompt = {"input_ids": rng.integers(0, args.vocab, (1, args.prompt), dtype=np.int64)}
    token_times = time_runs(sessions, token, args.repeat, warmup=3)
    prompt_times = time_runs(sessions, prompt, max(3, args.repeat // 3), warmup=1)
    ref = sessions["float"].run(None, prompt)[0]
    rows = []
    for name, sess in sessions.items():
        rows.append({
            "model": kind, "variant": name, "mib": model_bytes(paths[name]) / 2**20,
            "token": stats(token_times[name]), "prompt": stats(prompt_times[name]),
            "sqnr_db": None if name == "float" else sqnr_db(ref, sess.run(None, prompt)[0]),
        })
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median_ms']:.2f} ({s['q25_ms']:.2f}-{s['q75_ms']:.2f}; min {s['min_ms']:.2f})"

    print(f"\nlayers {args.layers}, hidden {args.hidden}, mlp {args.mlp}, vocab {args.vocab}; "
          f"ONNX Runtime CPU, {args.threads} thread(s); token: batch 1, 1 token, {args.repeat} runs; "
          f"prompt: {args.prompt} tokens, {max(3, args.repeat // 3)} runs; median (IQR; min) in ms; ratios of medians\n")
    print("| model | output | MiB | token ms | vs float | vs ORT | vs ORT class | prompt ms | vs float | vs ORT "
          "| vs ORT class | logits SQNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    peers = ("float", "ort", "ort-class")
    for r in rows:
        same = {x["variant"]: x for x in rows if x["model"] == r["model"]}
        ratio = {k: {v: r[k]["median_ms"] / same[v][k]["median_ms"] for v in peers} for k in ("token", "prompt")}
        sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
        cols = " | ".join(f"{cell(r[k])} | " + " | ".join(f"{ratio[k][v]:.2f}" for v in peers) for k in ("token", "prompt"))
        print(f"| {r['model']} | {r['variant']} | {r['mib']:.1f} | {cols} | {sqnr} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-llm"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeat", type=int, default=60, help="token runs per model (prompt: a third)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = []
    for kind in ("tied", "untied"):
        rows += bench_model(kind, args)
    print_table(rows, args)
    if args.json:
        print(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
