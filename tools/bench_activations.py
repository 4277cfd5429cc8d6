"""Inference speed of activation quantization on ONNX Runtime's CPU provider: fp32 vs W8A8 static
vs W8A8 dynamic vs W4A16, at batch 1, 16 and 128, 2 threads, in one run.

Model: MiniLM (``--model minilm``, sequences of ``--seq`` tokens) or CREPE tiny (``--model crepe-tiny``,
1024-sample frames). Variants, all from the same fp32 ONNX:

- ``fp32``;
- ``W8A8 static``: ``--activations uint8`` (per-tensor min-max from the held-out calibration feeds of
  ``tools/study_activations.py``), int8 per-channel QDQ weights;
- ``W8A8 dynamic``: ``--activations dynamic``;
- ``W4A16``: int4 blocks of 128 on MatMul and Gemm weights (MatMulNBits, no accuracy level written;
  Conv float).

The machine is shared: each (variant, batch) is timed in ``--rounds`` interleaved rounds of
``--iters`` runs after a warm-up, and the table gives the median per-run time over rounds (and
the spread, min..max of the round medians). The kernels column is what ONNX Runtime ran: the
integer/quantized op types of its optimized graph.

    PYTHONPATH=. python3 tools/bench_activations.py [--model minilm] [--rounds 5] [--out docs/study/activations/bench-minilm.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_activations import MODELS, W4, W8  # noqa: E402

from ox_quant.core.calibrate import Calibrator  # noqa: E402
from ox_quant.pipeline.activations import ActivationOptions  # noqa: E402
from ox_quant.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ox_quant.pipeline.policy import UNIFORM, Policy  # noqa: E402
from ox_quant.runtime.fusion import INTEGER_KERNELS, optimized_op_types  # noqa: E402
from ox_quant.runtime.session import make_session  # noqa: E402

BATCHES = (1, 16, 128)


def batch_feed(model: str, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    if model == "minilm":
        ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    frames = rng.standard_normal((batch, 1024)).astype(np.float32)
    return {"frames": frames}


def variants(src: Path, work: Path, model: str) -> dict[str, Path]:
    feeds = MODELS[model]()
    out = {"fp32": src}
    specs: dict[str, tuple[Any, Policy, ActivationOptions | None]] = {
        "W8A8 static": (W8, UNIFORM, ActivationOptions("uint8", Calibrator("minmax"), feeds=feeds)),
        "W8A8 dynamic": (W8, UNIFORM, ActivationOptions("dynamic")),
        "W4A16": (W4, Policy(gemm_bits="bits"), None),
    }
    for name, (config, policy, act) in specs.items():
        dst = work / f"{model}.{name.replace(' ', '_')}.onnx"
        convert(src, dst, ConvertOptions(config=config, policy=policy, activations=act))
        out[name] = dst
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(MODELS))
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0, help="runs per round (default: by batch, 20/5/2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from ox_quant_models.tasks import TASKS

    facts = TASKS[args.model].study
    assert facts is not None
    with tempfile.TemporaryDirectory(prefix="ox-act-bench-") as tmp:
        work = Path(tmp)
        src = facts.export(work / f"{args.model}.fp32.onnx")
        paths = variants(src, work, args.model)
        sessions = {name: make_session(p, exact=False, threads=args.threads) for name, p in paths.items()}
        kernels = {name: {op: n for op, n in optimized_op_types(p, threads=args.threads).items()
                          if op in INTEGER_KERNELS or op in ("DynamicQuantizeLinear", "QuantizeLinear")}
                   for name, p in paths.items()}
        feeds = {b: batch_feed(args.model, b, args.seq) for b in BATCHES}
        iters = {b: args.iters or {1: 20, 16: 5, 128: 2}[b] for b in BATCHES}
        for session in sessions.values():  # warm-up
            for b in BATCHES:
                session.run(None, feeds[b])
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for b in BATCHES:
                for name, session in sessions.items():
                    start = time.perf_counter()
                    for _ in range(iters[b]):
                        session.run(None, feeds[b])
                    times.setdefault((name, b), []).append((time.perf_counter() - start) / iters[b])
    lines = [f"# Inference speed, {args.model}: fp32 vs W8A8 static vs W8A8 dynamic vs W4A16", "",
             f"ONNX Runtime CPU provider, {args.threads} threads, "
             + (f"sequences of {args.seq} tokens" if args.model == "minilm" else "1024-sample frames")
             + f"; median over {args.rounds} interleaved rounds (the machine is shared: the spread is the min..max "
             "of the round medians); ratio = fp32 time / variant time (> 1: faster than fp32).", "",
             "| variant | " + " | ".join(f"batch {b} ms (spread)" for b in BATCHES) + " | "
             + " | ".join(f"x fp32 @{b}" for b in BATCHES) + " | ORT ran |",
             "|---|" + "---|" * (2 * len(BATCHES) + 1)]
    result: dict[str, Any] = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "rows": {}}
    for name in sessions:
        med = {b: statistics.median(times[(name, b)]) for b in BATCHES}
        cells = [f"{med[b] * 1e3:.2f} ({min(times[(name, b)]) * 1e3:.2f}..{max(times[(name, b)]) * 1e3:.2f})"
                 for b in BATCHES]
        ratios = [f"{statistics.median(times[('fp32', b)]) / med[b]:.2f}" for b in BATCHES]
        ran = ", ".join(f"{op} x{n}" for op, n in kernels[name].items()) or "float kernels only"
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {ran} |")
        result["rows"][name] = {"median_s": {str(b): med[b] for b in BATCHES},
                                "rounds_s": {str(b): times[(name, b)] for b in BATCHES}, "kernels": kernels[name]}
    cmd = (f"PYTHONPATH=. python3 tools/bench_activations.py --model {args.model} --rounds {args.rounds}"
           + (f" --out {args.out}" if args.out else ""))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    lines += ["", f"Command: `{cmd}`", "", f"CPU: {cpu} ({platform.machine()}); onnxruntime "
              f"{__import__('onnxruntime').__version__}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
