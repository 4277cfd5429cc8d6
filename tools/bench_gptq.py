#!/usr/bin/env python3
"""Benchmark: ``ox-quant convert --algorithm gptq|awq`` against ONNX Runtime's GPTQ
(``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig``), same model, same feeds.

Both read the same calibration feeds and use the same config (``--symmetric`` or not) (a folder of ``.npz`` files, one feed each, as
``convert --calibration DIR`` reads them), both write int4 MatMulNBits; each runs as its own
process, timed whole (wall time, peak RSS). With ``--task`` the written models are scored by
``ox-quant eval FILE --task TASK`` (e.g. ``minilm``: embedding cosine).

    python tools/bench_gptq.py model.onnx feeds/ --task minilm --block 128 --workdir /tmp/oxq-gptq
    python tools/bench_gptq.py minilm.onnx feeds/ --minilm-feeds-from emma.txt --count 32 ...

``--minilm-feeds-from TEXT`` first writes ``--count`` feeds into the (empty) feeds folder: one
sentence each (40-300 characters, from character 20000 on), tokenized by MiniLM's tokenizer.

ORT's GPTQ gathers every input on the float model in one pass (its activations all held in
memory); ox-quant's is sequential (each level calibrated on the model with the levels before
it quantized), so it makes one pass over the feeds per level. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ORT_SCRIPT = r"""
import sys, glob, numpy as np
from onnxruntime.quantization import matmul_nbits_quantizer as m
from onnxruntime.quantization.calibrate import CalibrationDataReader
src, feeds, out, bits, block, actorder, symmetric = sys.argv[1:8]
class Reader(CalibrationDataReader):
    def __init__(self):
        self.files = sorted(glob.glob(feeds + "/*.npz")); self.i = 0
    def get_next(self):
        if self.i >= len(self.files):
            return None
        self.i += 1
        return dict(np.load(self.files[self.i - 1]))
    def rewind(self):
        self.i = 0
cfg = m.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=int(block), actorder=actorder == "1")
q = m.MatMulNBitsQuantizer(src, bits=int(bits), block_size=int(block), is_symmetric=symmetric == "1",
                           algo_config=cfg)
q.process()
q.model.save_model_to_file(out, use_external_data_format=False)
"""


def _peak_rss_run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr tail) of a child process."""
    start = time.perf_counter()
    wrapped = ["/usr/bin/time", "-f", "%M"] + cmd if Path("/usr/bin/time").exists() else cmd
    proc = subprocess.run(wrapped, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        said = [line for line in lines if not line.strip().isdigit()][-1:]
        hint = " (ONNX Runtime's GPTQ asserts that every node has a unique name)" if "AssertionError" in said[0:1] else ""
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {said}{hint}")
    rss = int(lines[-1]) * 1024 if wrapped is not cmd and lines and lines[-1].isdigit() else 0
    return wall, rss, "\n".join(lines[-3:-1])


def _score(path: Path, task: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "ox_quant.cli", "eval", str(path), "--task", task, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["metrics"]


def write_minilm_feeds(text: Path, folder: Path, count: int) -> None:
    """``count`` one-sentence feeds (``input_ids``, ``attention_mask``) of MiniLM from ``text``."""
    import re

    import numpy as np

    from ox_quant_models import minilm

    body = text.read_text(encoding="utf-8")[20000:]
    sentences = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])\s+", body)]
    chosen = [s for s in sentences if 40 < len(s) < 300][:count]
    folder.mkdir(parents=True, exist_ok=True)
    for i, sentence in enumerate(chosen):
        feed = minilm.encode([sentence])
        np.savez(folder / f"f{i:03d}.npz", input_ids=feed["input_ids"], attention_mask=feed["attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("feeds", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--task", default=None)
    parser.add_argument("--symmetric", action="store_true", help="both tools symmetric (default: both asymmetric)")
    parser.add_argument("--workdir", type=Path, default=Path("oxq-gptq"))
    parser.add_argument("--algorithms", default="rtn,gptq,awq", help="ox-quant algorithms to run")
    parser.add_argument("--ort", default="gptq,gptq-actorder", help="ORT runs: gptq, gptq-actorder (empty: none)")
    parser.add_argument("--minilm-feeds-from", type=Path, default=None, help="write MiniLM feeds from this text first")
    parser.add_argument("--count", type=int, default=32, help="feeds written by --minilm-feeds-from")
    args = parser.parse_args()
    if args.minilm_feeds_from is not None:
        write_minilm_feeds(args.minilm_feeds_from, args.feeds, args.count)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for algorithm in [a for a in args.algorithms.split(",") if a]:
        out = args.workdir / f"oxq-{algorithm}.onnx"
        cmd = [sys.executable, "-m", "ox_quant.cli", "convert", str(args.model), "-o", str(out), "--algorithm",
               algorithm, "--bits", str(args.bits), "--granularity", f"block:{args.block}", "--format", "matmulnbits",
               "--symmetric" if args.symmetric else "--asymmetric"]
        if algorithm != "rtn":
            cmd += ["--calibration", str(args.feeds)]
        wall, rss, _ = _peak_rss_run(cmd)
        rows.append((f"ox-quant {algorithm}", out, wall, rss))
    for run in [r for r in args.ort.split(",") if r]:
        out = args.workdir / f"ort-{run}.onnx"
        cmd = [sys.executable, "-c", ORT_SCRIPT, str(args.model), str(args.feeds), str(out), str(args.bits),
               str(args.block), "1" if run == "gptq-actorder" else "0", "1" if args.symmetric else "0"]
        wall, rss, _ = _peak_rss_run(cmd)
        rows.append((f"ORT {run}", out, wall, rss))
    print(f"int{args.bits} block {args.block} {'sym' if args.symmetric else 'asym'}, feeds: {len(list(args.feeds.glob('*.npz')))} from {args.feeds}")
    for name, out, wall, rss in rows:
        metrics = _score(out, args.task) if args.task else {}
        shown = " ".join(f"{k} {v:.5f}" for k, v in metrics.items() if k.startswith(("cosine", "perplexity")))
        print(f"{name:24s} wall {wall:7.1f} s  peak RSS {rss / 2**20:7.0f} MiB  {shown}")


if __name__ == "__main__":
    main()
