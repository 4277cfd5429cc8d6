#!/usr/bin/env python3
"""Benchmark: ``ox-quant convert`` against ONNX Runtime's ``MatMulNBitsQuantizer``.

Generates a float32 model with LLM-shaped MatMuls (hidden 2048, MLP 5504; per layer
q/k/v/o 2048x2048, gate/up 2048x5504, down 5504x2048: ~193 MiB a layer) stored as
external data (or, with ``--embedded``, inside the .onnx file: protobuf caps that at 2 GB,
10 layers), then times both quantizers as whole processes in the same run, same config
(4-bit, block 128), and reports wall time and peak RSS of each and their ratio.

    python tools/bench_convert.py --layers 3 --workdir /tmp/oxq-bench
    python tools/bench_convert.py --layers 1 --embedded --workdir oxq-bench

Run by hand; needs ~2.5 GB of free disk for 3 layers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 2048
MLP = 5504


def build_model(path: Path, layers: int, seed: int = 0, embedded: bool = False) -> int:
    """Write the benchmark model (external data unless ``embedded``) and return its weight bytes."""
    from ox_quant.ir.examples import llm_shaped_model

    return llm_shaped_model(path, layers=layers, hidden=HIDDEN, mlp=MLP, seed=seed, external=not embedded)


def _vm_hwm(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) in bytes, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes, exit code) of that process.

    Peak RSS is the child's own VmHWM, sampled every 10 ms (getrusage's ru_maxrss would
    include the benchmark process's memory copied at fork time).
    """
    start = time.perf_counter()
    # Run outside any checkout: ``python -m`` puts the working directory first on sys.path,
    # and the ox_quant measured must be the one this script imports (PYTHONPATH or installed).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    peak = 0
    while proc.poll() is None:
        hwm = _vm_hwm(proc.pid)
        if hwm is not None and proc.poll() is None:
            peak = max(peak, hwm)
        time.sleep(0.01)
    wall = time.perf_counter() - start
    code = proc.returncode
    if code != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        sys.exit(f"command failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, peak, code


def dir_bytes(path: Path, stem: str) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(stem))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-convert"))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool; the best wall time is kept")
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--embedded", action="store_true", help="weights inside the .onnx file, not external data")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / "llm_shaped.onnx"
    t0 = time.perf_counter()
    weight_bytes = build_model(src, args.layers, embedded=args.embedded)
    layout = "embedded" if args.embedded else "external data"
    print(f"model: {args.layers} layers, {weight_bytes / 2**20:.0f} MiB of float32 MatMul weights, {layout} "
          f"(built in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    sym = not args.asymmetric
    ours_out = args.workdir / "ours.onnx"
    ort_out = args.workdir / "ort.onnx"
    ours_cmd = [sys.executable, "-m", "ox_quant.cli", "convert", str(src), "-o", str(ours_out),
                "--bits", "4", "--block-size", "128", "--format", "matmulnbits",
                "--symmetric" if sym else "--asymmetric"]
    ort_cmd = [sys.executable, "-m", "onnxruntime.quantization.matmul_nbits_quantizer",
               "--input_model", str(src), "--output_model", str(ort_out),
               "--bits", "4", "--block_size", "128", "--symmetric", str(sym)]

    results: dict[str, list[tuple[float, int]]] = {"ox-quant": [], "ort": []}
    for _ in range(args.repeat):
        for name, cmd, out in (("ox-quant", ours_cmd, ours_out), ("ort", ort_cmd, ort_out)):
            for p in args.workdir.iterdir():
                if p.name.startswith(out.stem):
                    p.unlink()
            wall, rss, _ = timed(cmd, args.workdir)
            results[name].append((wall, rss))
            print(f"{name}: {wall:.2f} s, peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)

    best = {name: (min(w for w, _ in runs), max(r for _, r in runs)) for name, runs in results.items()}
    ours_wall, ours_rss = best["ox-quant"]
    ort_wall, ort_rss = best["ort"]
    summary = {
        "layers": args.layers,
        "weight_mib": round(weight_bytes / 2**20, 1),
        "layout": layout,
        "config": f"int4 block128 {'sym' if sym else 'asym'}",
        "ox_quant_wall_s": round(ours_wall, 2),
        "ort_wall_s": round(ort_wall, 2),
        "wall_ratio_ox_over_ort": round(ours_wall / ort_wall, 3),
        "ox_quant_peak_rss_mib": round(ours_rss / 2**20, 1),
        "ort_peak_rss_mib": round(ort_rss / 2**20, 1),
        "rss_ratio_ox_over_ort": round(ours_rss / ort_rss, 3),
        "ox_quant_output_mib": round(dir_bytes(ours_out, ours_out.stem) / 2**20, 1),
        "ort_output_mib": round(dir_bytes(ort_out, ort_out.stem) / 2**20, 1),
    }
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
