#!/usr/bin/env python3
"""Benchmark: the calibration stage's schedules on an LLM-shaped model.

Builds ``ox_quant.ir.examples.llm_shaped_model`` (``--layers`` layers, hidden 576, MLP 1536,
vocabulary 2000, seeded random weights), feeds ``--samples`` random token windows of
``--seq-len`` tokens, and times ``ox_quant.calibration.driver.calibrate`` on every MatMul
weight (int4 block 32) three ways, in one run:

* one pass (round-to-nearest: statistics from the float model);
* sequential, segments (a sequential round-to-nearest: each level's new nodes only);
* sequential, whole prefix (``segments=False``: the model run from its inputs per level).

Prints wall time, passes, the state and cache peaks, and the largest relative difference of
the calibration errors between the two sequential runs.

    python tools/bench_calibration.py --layers 8 --samples 16 --seq-len 256 --workdir /tmp/oxq-cal

Run by hand (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    from ox_quant.algorithms.rtn import RoundToNearest
    from ox_quant.calibration.driver import Target, calibrate
    from ox_quant.calibration.feeds import FeedSource
    from ox_quant.core.config import Block, QuantConfig
    from ox_quant.ir.examples import llm_shaped_model
    from ox_quant.ir.modelio import load_model
    from ox_quant.ir.sites import find_sites

    class SequentialRtn(RoundToNearest):
        name = "sequential-rtn"
        sequential = True

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"llm-{args.layers}.onnx"
    if not path.exists():
        llm_shaped_model(path, layers=args.layers, hidden=576, mlp=1536, vocab=2000, external=True)
    model = load_model(path)
    sites = [s for s in find_sites(model)[0] if s.kinds != {"gather"}]
    rng = np.random.default_rng(0)
    windows = [{"input_ids": rng.integers(0, 2000, (1, args.seq_len))} for _ in range(args.samples)]
    feeds = FeedSource("random tokens", len(windows), lambda: iter(windows))
    config = QuantConfig(bits=4, granularity=Block(32))
    errors = {}
    print(f"{len(sites)} weights, {args.samples} x {args.seq_len} tokens, {args.layers} layers")
    for label, quantizer, segments in (("one pass", RoundToNearest(), True),
                                       ("sequential, segments", SequentialRtn(), True),
                                       ("sequential, whole prefix", SequentialRtn(), False)):
        started = time.perf_counter()
        result = calibrate(model, [Target(s, config, quantizer) for s in sites], feeds, segments=segments,
                           workdir=args.workdir)
        seconds = time.perf_counter() - started
        errors[label] = {name: r.error for name, r in result.reports.items()}
        print(f"{label:26s} {seconds:7.1f} s  {result.passes:3d} passes  state peak {result.peak_state_bytes / 2**20:.1f} MiB"
              f"  cache peak {result.cache_peak_bytes / 2**20:.1f} MiB")
        result.close()
    a, b = errors["sequential, segments"], errors["sequential, whole prefix"]
    worst = max(abs(a[n] - b[n]) / max(abs(b[n]), 1e-30) for n in b)
    print(f"largest relative difference of calibration errors, segments vs whole prefix: {worst:.2e}")


if __name__ == "__main__":
    main()
