#!/usr/bin/env python3
"""Benchmark: decode tokens/s, prefill latency and peak memory of LLM folders (key-value cache),
ONNX Runtime CPU, batch 1, the same settings for all.

Each model is measured by ``ox_quant.evaluation.bench.bench`` (one child process per model and
round: ``peak_rss_mib`` is that process's peak resident set, ``ru_maxrss``). The models run in
``--rounds`` rounds, the order rotated each round, so that load from other processes on the
machine falls on all of them alike; the table gives the median over rounds of each round's
median (of ``--repeats`` timed runs after one warm-up).

    python tools/bench_kv.py --threads 2 --rounds 3 fp32=DIR int4-b32=DIR2 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from ox_quant.evaluation.bench import BenchSettings, bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=DIR", help="first is the reference for ratios")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_out", default=None, help="also write all figures here")
    args = parser.parse_args(argv)
    models = [m.split("=", 1) for m in args.models]
    settings = BenchSettings(batch=args.batch, prompt_len=args.prompt_len, gen=args.gen, threads=args.threads,
                             repeats=args.repeats)
    runs: dict[str, list[dict]] = {label: [] for label, _ in models}
    for r in range(args.rounds):
        order = models[r % len(models):] + models[:r % len(models)]
        for label, path in order:
            runs[label].append(bench(path, settings))
            print(f"round {r + 1} {label}: {runs[label][-1]['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    rows = {}
    for label, results in runs.items():
        rows[label] = {k: statistics.median(x[k] for x in results)
                       for k in ("decode_tokens_per_s", "prefill_ms", "peak_rss_mib", "rss_before_load_mib")}
        rows[label]["file_mib"] = results[0]["file_bytes"] / 2**20
        rows[label]["decode_round_range"] = (min(x["decode_tokens_per_s"] for x in results),
                                             max(x["decode_tokens_per_s"] for x in results))
    ref = rows[models[0][0]]
    print(f"batch {args.batch}, {args.threads} threads, prefill {args.prompt_len} tokens, decode {args.gen} tokens, "
          f"{args.rounds} rounds x {args.repeats} repeats (medians)")
    print("| model | decode tokens/s (range over rounds) | x fp32 | prefill ms | peak RSS MiB | model file MiB |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        lo, hi = row["decode_round_range"]
        print(f"| {label} | {row['decode_tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | "
              f"{row['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f} | {row['prefill_ms']:.0f} | "
              f"{row['peak_rss_mib']:.0f} | {row['file_mib']:.0f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
