#!/usr/bin/env python3
"""Accuracy of ``--algorithm rtn|mse|hqq`` (and ``mse`` with text calibration) on MiniLM.

Exports ``minilm`` (needs its package, tools/setup_models.sh), then for each config converts it
with each algorithm and scores it with ``ox-quant eval --task minilm`` (sentence-embedding
cosine with fp32 on the task's 24 sentences). ``mse+cal`` calibrates on the first
``--samples`` windows of ``--seq-len`` tokens of a bundled text (Emma, not the scored
sentences). Prints a markdown table of cosine_mean, bits per weight and convert wall time.

    python tools/compare_algorithms.py --workdir /tmp/oxq-alg

Run by hand (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ((4, 128), (4, 32), (3, 32), (2, 32))
ALGORITHMS = ("rtn", "hqq", "mse", "mse+cal")


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ox_quant.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip())
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    from ox_quant.evaluation.textdata import text_files

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "minilm.onnx"
    if not model.exists():
        cli("export", "minilm", "-o", str(model))
    text = work / "emma.txt"
    emma = next(p for p in text_files() if p.name.startswith("emma"))
    text.write_text(gzip.decompress(emma.read_bytes()).decode("utf-8"), encoding="utf-8")
    print("| config | bits/weight | " + " | ".join(ALGORITHMS) + " |")
    print("|---" * (len(ALGORITHMS) + 2) + "|")
    for bits, block in CONFIGS:
        cells, bpw = [], None
        for algorithm in ALGORITHMS:
            out = work / "q.onnx"
            flags = ["--bits", str(bits), "--block-size", str(block), "--algorithm", algorithm.split("+")[0], "--json"]
            if algorithm.endswith("+cal"):
                flags += ["--calibration", str(text), "--tokenizer", "minilm", "--calibration-samples",
                          str(args.samples), "--calibration-seq-len", str(args.seq_len)]
            started = time.perf_counter()
            report = json.loads(cli("convert", str(model), "-o", str(out), *flags))
            seconds = time.perf_counter() - started
            bpw = report["bits_per_weight"]
            metrics = json.loads(cli("eval", str(out), "--task", "minilm", "--json"))["metrics"]
            cells.append(f"{metrics['cosine_mean']:.4f} ({seconds:.1f} s)")
        print(f"| int{bits} block:{block} | {bpw:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
