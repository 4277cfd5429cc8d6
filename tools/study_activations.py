"""Activation quantization on real models against ONNX Runtime's quantize_static / quantize_dynamic:
docs/study/activations/.

For each model (MiniLM, CREPE tiny; ``--models``) it exports the fp32 ONNX once, builds one set
of calibration feeds that is *not* the evaluation data (MiniLM: sentences of the bundled Austen
text; CREPE: tones of another seed), and scores on the model's task:

- ox-quant W8A8 static uint8 per tensor, calibrators minmax / percentile:99.99 / entropy / mse;
  per channel (min-max); per token (int8, dynamic); dynamic (uint8 per tensor); minmax with
  SmoothQuant alpha 0.5; W8A16 (int8 per-channel weights only) and W4A16 (int4 blocks of 128,
  asymmetric, MatMulNBits, on MatMul and Gemm weights; Conv float as 4 bits break CNNs);
- ONNX Runtime ``quantize_static`` (QDQ, per-channel QInt8 weights, QUInt8 activations, the same
  calibration feeds) with its MinMax, Entropy and Percentile calibrators, as it ships (every op
  type it supports), with ``reduce_range=True`` (7-bit weights, its advice for CPUs without
  VNNI), and restricted to MatMul/Gemm/Conv (MinMax, Entropy); ``quantize_dynamic`` (QInt8 weights).

Weights quantized by every ox-quant W8 row: MatMul, Gemm and Conv (``UNIFORM`` policy: Conv too,
as quantize_static does). Each row also lists the integer kernels ONNX Runtime ran (its
optimized graph). Every number comes from one run of this script.

    PYTHONPATH=. python3 tools/study_activations.py --out docs/study/activations [--models minilm,crepe-tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ox_quant.core.calibrate import Calibrator  # noqa: E402
from ox_quant.core.config import Block, Format, PerChannel, QuantConfig  # noqa: E402
from ox_quant.pipeline.activations import ActivationOptions  # noqa: E402
from ox_quant.pipeline.convert import ConvertOptions, convert  # noqa: E402
from ox_quant.pipeline.policy import UNIFORM, Policy  # noqa: E402
from ox_quant.runtime.fusion import integer_kernels, optimized_op_types  # noqa: E402

W8 = QuantConfig(bits=8, granularity=PerChannel(), symmetric=False, format=Format.QDQ)
W4 = QuantConfig(bits=4, granularity=Block(128), symmetric=False)


def minilm_feeds(count: int = 8, batch: int = 8, length: int = 64) -> list[dict[str, np.ndarray]]:
    """``count`` batches of ``batch`` Austen sentences, each padded (or cut) to ``length`` tokens:
    one shape for every feed (quantize_static's histogram calibrators stack them)."""
    from ox_quant.evaluation.textdata import read_text, text_files
    from ox_quant_models import minilm

    text = read_text(text_files()[0])
    sentences = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 300]
    picked = sentences[1000:1000 + count * batch]
    feeds = []
    for i in range(count):
        enc = minilm.encode(picked[i * batch:(i + 1) * batch])
        ids = np.zeros((batch, length), np.int64)
        mask = np.zeros((batch, length), np.int64)
        t = min(length, enc["input_ids"].shape[1])
        ids[:, :t], mask[:, :t] = enc["input_ids"][:, :t], enc["attention_mask"][:, :t]
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def crepe_feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    from ox_quant_models.tasks.pitch import SEED, tones

    frames, _ = tones(count=count, frames_per_tone=4, seed=SEED + 1)
    return [{"frames": frames[i * 4:(i + 1) * 4]} for i in range(count)]


def ppocr_feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    """Lines of the Austen text (not the evaluation lines), rendered as the task renders them and
    padded to one width (quantize_static's histogram calibrators stack the feeds)."""
    from ox_quant.evaluation.textdata import read_text, text_files
    from ox_quant_models.tasks.ocr import preprocess, render

    words = read_text(text_files()[0]).split()[5000:]
    lines = [" ".join(words[i * 7:(i + 1) * 7]) for i in range(count)]
    images = [preprocess(render(line)) for line in lines]
    width = max(im.shape[-1] for im in images)
    feeds = []
    for im in images:
        padded = np.zeros(im.shape[:-1] + (width,), np.float32)
        padded[..., :im.shape[-1]] = im
        feeds.append({"x": padded})
    return feeds


SMOLLM2_TEXT = "ox_quant/data/text/prideprejudice.txt.gz"
"""SmolLM2's scored text: never the calibration text (emma.txt, the study's calibration source)."""


def smollm2_feeds(count: int = 8, length: int = 128) -> list[dict[str, np.ndarray]]:
    """``count`` windows of ``length`` tokens of the study's calibration text (emma.txt)."""
    from ox_quant_models.tasks import TASKS

    facts = TASKS["smollm2"].study
    assert facts is not None
    calib = facts.calibration_feeds(count, length)
    assert calib is not None
    source, _, feeds = calib
    assert Path(source).name not in Path(SMOLLM2_TEXT).name, "calibration and scored text must differ"
    return feeds


MODELS: dict[str, Callable[[], list[dict[str, np.ndarray]]]] = {
    "minilm": minilm_feeds, "crepe-tiny": crepe_feeds, "ppocr-rec": ppocr_feeds, "smollm2": smollm2_feeds}
#: Task options per model (SmolLM2: 1024 tokens of a text the calibration does not read, windows of 256).
TASK_OPTIONS: dict[str, dict[str, Any]] = {"smollm2": {"text": SMOLLM2_TEXT, "max_tokens": 1024, "context": 256}}


def _inputs_of(path: Path) -> list[str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def ox_rows() -> list[tuple[str, QuantConfig, Policy, ActivationOptions | None]]:
    mm = Calibrator("minmax")
    return [
        ("ox W8A8 uint8 tensor minmax", W8, UNIFORM, ActivationOptions("uint8", mm)),
        ("ox W8A8 uint8 tensor percentile:99.99", W8, UNIFORM, ActivationOptions("uint8", Calibrator("percentile", 99.99))),
        ("ox W8A8 uint8 tensor entropy", W8, UNIFORM, ActivationOptions("uint8", Calibrator("entropy"))),
        ("ox W8A8 uint8 tensor mse", W8, UNIFORM, ActivationOptions("uint8", Calibrator("mse"))),
        ("ox W8A8 uint8 channel minmax", W8, UNIFORM, ActivationOptions("uint8", mm, "channel")),
        ("ox W8A8 int8 token (dynamic)", W8, UNIFORM, ActivationOptions("int8", mm, "token")),
        ("ox W8A8 dynamic uint8 tensor", W8, UNIFORM, ActivationOptions("dynamic")),
        ("ox W8A8 uint8 tensor minmax + SmoothQuant 0.5", W8, UNIFORM, ActivationOptions("uint8", mm, smooth_alpha=0.5)),
        ("ox W8A16 (weights int8 channel)", W8, UNIFORM, None),
        ("ox W4A16 (int4 block 128 MatMul/Gemm, Conv float)", W4, Policy(gemm_bits="bits"), None),
    ]


MATMUL_OPS = ["MatMul", "Gemm", "Conv"]
"""The op types ox-quant quantizes (quantize_static also quantizes activation x activation MatMuls among them)."""


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]], names: list[str]):
        self.feeds, self.names, self.i = feeds, names, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return {k: self.feeds[self.i - 1][k] for k in self.names}

    def rewind(self) -> None:
        self.i = 0


def peer_rows(src: Path, work: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, Callable[[Path], None]]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    names = _inputs_of(src)

    def static(method: Any, reduce_range: bool = False, ops: list[str] | None = None) -> Callable[[Path], None]:
        def run(dst: Path) -> None:
            reader = _Reader(feeds, names)
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            reduce_range=reduce_range, op_types_to_quantize=ops)
        return run

    def dynamic(dst: Path) -> None:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)

    return [
        ("ORT quantize_static MinMax", static(CalibrationMethod.MinMax)),
        ("ORT quantize_static Entropy", static(CalibrationMethod.Entropy)),
        ("ORT quantize_static Percentile", static(CalibrationMethod.Percentile)),
        ("ORT quantize_static MinMax reduce_range", static(CalibrationMethod.MinMax, True)),
        ("ORT quantize_static MinMax, MatMul/Gemm/Conv only", static(CalibrationMethod.MinMax, False, MATMUL_OPS)),
        ("ORT quantize_static Entropy, MatMul/Gemm/Conv only", static(CalibrationMethod.Entropy, False, MATMUL_OPS)),
        ("ORT quantize_dynamic QInt8", dynamic),
    ]


def measure(model: str, path: Path, extras: dict[str, Any]) -> dict[str, Any]:
    from ox_quant_models.tasks import TASKS

    task = TASKS[model]
    result = task.function()(str(path), **extras)
    kernels = integer_kernels(optimized_op_types(path))
    return {"metrics": result.metrics, "primary": result.primary, "kernels": kernels,
            "bytes": path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))}


def study(model: str, work: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from ox_quant_models.tasks import TASKS

    facts = TASKS[model].study
    assert facts is not None
    src = facts.export(work / f"{model}.fp32.onnx")
    extras = {**facts.task_extras(), **TASK_OPTIONS.get(model, {})}
    names = _inputs_of(src)
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    rows: list[dict[str, Any]] = [{"row": "fp32", **measure(model, src, extras)}]
    for label, config, policy, act in ox_rows():
        dst = work / f"{model}.{len(rows)}.onnx"
        if act is not None:
            act = ActivationOptions(act.mode, act.calibrator, act.granularity, feeds, act.smooth_alpha)
        start = time.perf_counter()
        try:
            convert(src, dst, ConvertOptions(config=config, policy=policy, activations=act))
        except Exception as exc:  # a row that fails is reported, not hidden
            rows.append({"row": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"row": label, "seconds": time.perf_counter() - start, **measure(model, dst, extras)})
        dst.unlink()
        print(f"  {label}: {rows[-1]['metrics'][facts.metric.name]:.5f}", file=sys.stderr)
    for label, run in peer_rows(src, work, feeds):
        dst = work / f"{model}.{len(rows)}.onnx"
        start = time.perf_counter()
        try:
            run(dst)
        except Exception as exc:
            rows.append({"row": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        rows.append({"row": label, "seconds": time.perf_counter() - start, **measure(model, dst, extras)})
        dst.unlink()
        print(f"  {label}: {rows[-1]['metrics'][facts.metric.name]:.5f}", file=sys.stderr)
    return {"model": model, "metric": facts.metric.name, "higher_is_better": facts.metric.higher_is_better,
            "calibration_feeds": len(feeds), "rows": rows}


def render(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# Activation quantization: ox-quant against ONNX Runtime's quantize_static / quantize_dynamic", "",
             "Measured by `tools/study_activations.py` in one run (command below); every number is from that run.",
             "Calibration feeds are held out from the evaluation data (MiniLM: Austen sentences, 8 batches of 8; "
             "CREPE: 8 batches of 4 frames of tones of another seed; SmolLM2: 8 windows of 128 tokens of emma.txt, "
             "scored on 1024 tokens of prideprejudice.txt in windows of 256); the same feeds go to ox-quant and to "
             "quantize_static.", ""]
    for res in results:
        metric = res["metric"]
        arrow = "higher is better" if res["higher_is_better"] else "lower is better"
        lines += [f"## {res['model']}", "", f"Task metric: `{metric}` ({arrow}); integer kernels = what ONNX Runtime's "
                  "CPU optimizer ran (its optimized graph).", "",
                  f"| row | {metric} | other metrics | size | ORT integer kernels |", "|---|---|---|---|---|"]
        for row in res["rows"]:
            if "error" in row:
                lines.append(f"| {row['row']} | failed: {row['error'][:120]} | | | |")
                continue
            m = row["metrics"]
            others = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k != metric)
            kernels = ", ".join(f"{k} x{v}" for k, v in row["kernels"].items()) or "none"
            lines.append(f"| {row['row']} | {m[metric]:.5f} | {others} | {row['bytes'] / 2**20:.1f} MiB | {kernels} |")
        lines.append("")
    lines += ["## Command", "", "```", command, "```", "", f"Machine: {platform.machine()}, {platform.processor() or ''} "
              f"python {platform.python_version()}; onnxruntime {_ort_version()}.", ""]
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="minilm,crepe-tiny")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python3 tools/study_activations.py --out " + str(args.out) + (
        f" --models {args.models}" if args.models != "minilm,crepe-tiny" else "")
    data = args.out / "results.json"
    if args.report_only:
        results = json.loads(data.read_text())["results"]
    else:
        results = []
        with tempfile.TemporaryDirectory(prefix="ox-act-study-") as tmp:
            for model in args.models.split(","):
                print(model, file=sys.stderr)
                results.append(study(model, Path(tmp), MODELS[model]()))
        data.write_text(json.dumps({"command": command, "results": results}, indent=1, default=float))
    (args.out / "README.md").write_text(render(results, command))


if __name__ == "__main__":
    main()
