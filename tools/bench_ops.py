#!/usr/bin/env python3
"""Latency of ox_quant.MatMulNBits (3-bit, float and int8 activations) against ONNX Runtime's 4-bit com.microsoft.MatMulNBits
and a float32 MatMul, same process, same session settings.

    python tools/bench_ops.py [--threads 2] [--repeat 200] [--json]

Each model is one node, Y[M, N] = A[M, K] @ W; weights are random codes, block size 32,
asymmetric (zero points). "acc0" / "acc4" are accuracy_level 0 (float activations) and 4 (A
quantized to int8 per block), for ox_quant.MatMulNBits as for ORT's. The median and minimum of
``--repeat`` timed runs (after warm-up) are reported (M = 1; a tenth of that, at least 20, for M > 1).
Needs the CPU custom-op library (``ox-quant build-ops``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ox_quant.core.packing import pack_matmulnbits, pack_zero_points  # noqa: E402
from ox_quant.formats.custom_matmul import custom_matmul_initializers, make_custom_matmul_node  # noqa: E402
from ox_quant.runtime.session import make_session  # noqa: E402

IR_VERSION = 10


def _model(node, inits, k: int, n: int, opsets) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=IR_VERSION)


def build_models(k: int, n: int, block: int, out: Path, rng: np.random.Generator) -> dict[str, Path]:
    """One-node models for W[K, N]: custom 3-bit and ORT 4-bit (accuracy levels 0 and 4 each), float32."""
    nb = -(-k // block)
    paths: dict[str, Path] = {}
    # ox_quant 3-bit
    codes3 = rng.integers(0, 8, (k, n))
    w3 = custom_matmul_initializers(codes3, rng.uniform(0.01, 0.02, (nb, n)), rng.integers(0, 8, (nb, n)), 3, block)
    for level in (0, 4):
        node = make_custom_matmul_node("A", "Y", {key: key for key in w3.inputs}, w3.attributes, accuracy_level=level)
        inits = [numpy_helper.from_array(v, key) for key, v in w3.inputs.items()]
        key = f"ox_quant 3-bit acc{level}"
        paths[key] = out / f"custom3_acc{level}.onnx"
        onnx.save(_model(node, inits, k, n, [("", 21), ("ox_quant", 1)]), paths[key])
    # com.microsoft 4-bit
    codes4 = rng.integers(0, 16, (k, n))
    packed = pack_matmulnbits(codes4.astype(np.uint8), 4, block)
    scales = rng.uniform(0.01, 0.02, (n * nb,)).astype(np.float32)
    zps = pack_zero_points(rng.integers(0, 16, (nb, n)).astype(np.uint8), 4)
    for level in (0, 4):
        inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales"),
                 numpy_helper.from_array(zps, "zp")]
        node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=block, accuracy_level=level)
        key = f"ORT MatMulNBits 4-bit acc{level}"
        paths[key] = out / f"ort4_acc{level}.onnx"
        onnx.save(_model(node, inits, k, n, [("", 21), ("com.microsoft", 1)]), paths[key])
    # float32
    w = rng.standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    paths["float32 MatMul"] = out / "fp32.onnx"
    onnx.save(_model(node, [numpy_helper.from_array(w, "W")], k, n, [("", 21)]), paths["float32 MatMul"])
    return paths


def time_sessions(paths: dict[str, Path], a: np.ndarray, threads: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median and minimum latency (ms) of ``session.run`` on ``a`` for each model.

    The models take turns (one run each per round), so that load from other processes
    falls on all of them alike.
    """
    sessions = {name: make_session(path, "cpu", exact=True, threads=threads) for name, path in paths.items()}
    feeds = {"A": a}
    for sess in sessions.values():
        for _ in range(max(3, repeat // 10)):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(t) * 1e3, "min": min(t) * 1e3} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--shapes", default="2048x2048,2048x5504", help="KxN,KxN,...")
    ap.add_argument("--ms", default="1,128", help="M values")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            k, n = (int(x) for x in shape.split("x"))
            models = build_models(k, n, args.block_size, Path(tmp), rng)
            for m in (int(x) for x in args.ms.split(",")):
                a = rng.standard_normal((m, k)).astype(np.float32)
                reps = args.repeat if m == 1 else max(20, args.repeat // 10)
                rows.append({"M": m, "K": k, "N": n, "latency_ms": time_sessions(models, a, args.threads, reps)})
    if args.json:
        print(json.dumps({"threads": args.threads, "block_size": args.block_size, "rows": rows}, indent=2))
        return
    names = list(rows[0]["latency_ms"])
    print(f"threads={args.threads} block_size={args.block_size}; median ms (min ms); ratios: median (min)")
    ratios = ["3-bit acc0 / ORT 4-bit acc0", "3-bit acc4 / ORT 4-bit acc4", "fp32 / 3-bit acc0", "fp32 / 3-bit acc4"]
    print("| M | K x N | " + " | ".join(names + ratios) + " |")
    print("|---" * (len(names) + len(ratios) + 2) + "|")
    for r in rows:
        lat = r["latency_ms"]

        def ratio(num: str, den: str, lat: dict = lat) -> str:
            return f"{lat[num]['median'] / lat[den]['median']:.2f} ({lat[num]['min'] / lat[den]['min']:.2f})"

        cells = [f"{lat[x]['median']:.3f} ({lat[x]['min']:.3f})" for x in names]
        cells += [ratio("ox_quant 3-bit acc0", "ORT MatMulNBits 4-bit acc0"),
                  ratio("ox_quant 3-bit acc4", "ORT MatMulNBits 4-bit acc4"),
                  ratio("float32 MatMul", "ox_quant 3-bit acc0"), ratio("float32 MatMul", "ox_quant 3-bit acc4")]
        print(f"| {r['M']} | {r['K']}x{r['N']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
