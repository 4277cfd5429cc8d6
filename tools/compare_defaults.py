"""ox-quant's default against ONNX Runtime's default quantizer, on real models: docs/defaults.md.

For each model and each of int4 (block 128) and int8 it writes, from the same fp32 ONNX:

- ``ox-quant default``: ``ox-quant convert MODEL --bits B`` (the CLI's defaults, read from the
  command: MatMul at B bits, blocks of 128, asymmetric; Gemm, Conv and embedding tables float);
- ``ORT default``: ``MatMulNBitsQuantizer(model, bits=B)`` with the class's other defaults
  (block_size 128, is_symmetric False, QOperator, MatMul weights only) -- the reference;
- ``ORT CLI default``: its command-line script's defaults (symmetric; its block 32 replaced
  by 128 so that every row has the same block size);
- ``ox-quant --symmetric``: the symmetric alternative (``--symmetric-rule`` default);
- ``ox-quant + Gemm``: ``--gemm-bits bits``, Gemm weights quantized like MatMul ones (ORT's
  quantizer leaves them float);
- ``ox-quant + int8 Conv/embeddings``: ``--conv-bits 8 --embedding-bits 8``, and at int4 only
  ``ox-quant + int4 Conv/embeddings``: ``--conv-bits 4 --embedding-bits 4`` (what every weight
  got before the policy): the measurements behind the policy;

and measures each: file size; SQNR of the first model output against the fp32 ONNX
(``ox_quant.verification.verify``) on the model's task inputs; the task metric.

    PYTHONPATH=. python3 tools/compare_defaults.py --out docs/defaults.md [--models minilm,magika]
    PYTHONPATH=. python3 tools/compare_defaults.py --out docs/defaults.md --report-only

Results also go to ``<out>.json`` (``docs/defaults.json``); ``--report-only`` re-renders
the table from it. Kept small for a 2-core machine (SmolLM2: 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ox_quant.core.config import Block, QuantConfig  # noqa: E402
from ox_quant.ir.modelio import model_bytes  # noqa: E402

SMOLLM2_TOKENS, SMOLLM2_CONTEXT = 256, 128


@dataclass(frozen=True)
class Case:
    """One real model: how to get its fp32 ONNX, its task inputs, and its task metric."""

    name: str
    architecture: str
    build: Callable[[Path], Path]
    feeds: Callable[[Path], dict[str, np.ndarray]]
    score: Callable[[Path], dict[str, float]]
    metric: str
    higher_is_better: bool
    metric_note: str


def _first_input(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _export(name: str) -> Callable[[Path], Path]:
    def build(work: Path) -> Path:
        from ox_quant_models.tasks import study_facts

        return study_facts(name).export(work / f"{name}.onnx")
    return build


def _prepare(relative: str | None) -> Callable[[Path], Path]:
    def build(work: Path) -> Path:
        from ox_quant_models import ppocr

        source = None if relative is None else ppocr.package_model(relative)
        return ppocr.prepare(work / f"{Path(relative or ppocr.REC_MODEL).stem}.onnx", source)
    return build


def _minilm_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models import minilm
    from ox_quant_models.tasks.sentences import sentences

    return dict(minilm.encode(sentences()))


_MINILM_REFERENCE: list[np.ndarray] = []


def _minilm_score(path: Path) -> dict[str, float]:
    from ox_quant_models.tasks import study_facts
    from ox_quant_models.tasks.embedding import evaluate

    if not _MINILM_REFERENCE:
        _MINILM_REFERENCE.append(study_facts("minilm").task_extras()["reference"])
    return evaluate(path, reference=_MINILM_REFERENCE[0]).metrics


def _smollm2_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.perplexity import load_token_lists, windows

    lists, _ = load_token_lists(None, SMOLLM2_CONTEXT)
    return {"input_ids": windows(lists, SMOLLM2_CONTEXT)[0]}


def _smollm2_score(path: Path) -> dict[str, float]:
    from ox_quant_models.tasks.perplexity import evaluate

    return evaluate(path, max_tokens=SMOLLM2_TOKENS, context=SMOLLM2_CONTEXT).metrics


def _crepe_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.pitch import tones

    return {"frames": tones()[0]}


def _task_score(module: str, function: str = "evaluate") -> Callable[[Path], dict[str, float]]:
    def score(path: Path) -> dict[str, float]:
        import importlib

        return importlib.import_module(module).__getattribute__(function)(path).metrics
    return score


def _rec_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.ocr import LINES, preprocess, render

    lines = [preprocess(render(line)) for line in LINES]
    width = max(x.shape[-1] for x in lines)
    batch = np.zeros((len(lines), 3, lines[0].shape[2], width), dtype=np.float32)
    for i, x in enumerate(lines):
        batch[i, :, :, :x.shape[-1]] = x[0]
    return {_first_input(path): batch}


def _det_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.ocr_aux import pages

    return {_first_input(path): pages()[0]}


def _cls_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.ocr_aux import crops

    return {_first_input(path): crops()[0]}


def _magika_build(work: Path) -> Path:
    from ox_quant_models import magika

    return Path(shutil.copy(magika.onnx_path(), work / "magika.onnx"))


def _magika_feeds(path: Path) -> dict[str, np.ndarray]:
    from ox_quant_models.tasks.filetype import inputs

    return {_first_input(path): inputs()}


CASES: dict[str, Case] = {c.name: c for c in (
    Case("minilm", "BERT encoder (all-MiniLM-L6-v2)", _export("minilm"), _minilm_feeds, _minilm_score,
         "cosine_mean", True, "mean cosine of 24 sentence embeddings vs fp32 torch"),
    Case("smollm2", "Llama decoder, tied embeddings (SmolLM2-135M)", _export("smollm2"), _smollm2_feeds,
         _smollm2_score, "perplexity", False, f"perplexity, {SMOLLM2_TOKENS} tokens, windows of {SMOLLM2_CONTEXT}"),
    Case("crepe-tiny", "pitch CNN (CREPE tiny)", _export("crepe-tiny"), _crepe_feeds,
         _task_score("ox_quant_models.tasks.pitch"), "cents_error_mean", False, "mean pitch error (cents), 64 frames"),
    Case("ppocr-rec", "CNN + attention text recogniser (PP-OCRv4 rec)", _prepare(None), _rec_feeds,
         _task_score("ox_quant_models.tasks.ocr"), "cer", False, "character error rate, 8 rendered lines"),
    Case("ppocr-det", "DB text detector CNN (PP-OCRv4 det)", _prepare("models/ch_PP-OCRv4_det_infer.onnx"),
         _det_feeds, _task_score("ox_quant_models.tasks.ocr_aux", "evaluate_detector"), "mask_iou", True,
         "text-mask IoU vs fp32, 2 rendered pages"),
    Case("ppocr-cls", "orientation classifier CNN (PP-OCR mobile v2 cls)",
         _prepare("models/ch_ppocr_mobile_v2.0_cls_infer.onnx"), _cls_feeds,
         _task_score("ox_quant_models.tasks.ocr_aux", "evaluate_classifier"), "accuracy", True,
         "0/180 accuracy, 48 rendered crops"),
    Case("magika", "file-type CNN (magika standard_v3_3)", _magika_build, _magika_feeds,
         _task_score("ox_quant_models.tasks.filetype"), "agreement", True, "label agreement with fp32, 64 repository files"),
)}

TOOLS = ("ox-quant default", "ORT default", "ORT CLI default", "ox-quant --symmetric", "ox-quant + Gemm",
         "ox-quant + int8 Conv/embeddings", "ox-quant + int4 Conv/embeddings")
EXTRA_WIDTH = {TOOLS[5]: 8, TOOLS[6]: 4}
PEERS = {"ORT default": False, "ORT CLI default": True}  # tool -> is_symmetric
SIZE_TOLERANCE = 0.001  # sizes within 0.1 % count as equal (the difference is shown)
METRIC_TOLERANCE = 1e-5  # task metrics this close count as equal (float noise of the same codes)


def cli_defaults() -> dict[str, Any]:
    """The default of every ``ox-quant convert`` option, read from the command itself."""
    from ox_quant.commands.convert import convert as command

    return {p.name: p.default for p in command.params}


def ox_quant(src: Path, out: Path, bits: int, variant: str) -> int:
    """Convert with ox-quant as the CLI does; returns the number of weights quantized."""
    from ox_quant.core.config import SymmetricRule
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.pipeline.policy import SAME, Policy

    defaults = cli_defaults()
    symmetric = True if variant == "ox-quant --symmetric" else bool(defaults["symmetric"])
    config = QuantConfig(bits=bits, granularity=Block(128), symmetric=symmetric,
                         symmetric_rule=SymmetricRule(defaults["symmetric_rule"]))
    width = EXTRA_WIDTH.get(variant)
    policy = Policy(conv_bits=width, embedding_bits=width) if width else Policy()
    if variant == "ox-quant + Gemm":
        policy = Policy(gemm_bits=SAME)
    return len(convert(src, out, ConvertOptions(config=config, policy=policy)).quantized)


def ort_default(src: Path, out: Path, bits: int, symmetric: bool | None = None) -> int:
    """``MatMulNBitsQuantizer(model, bits=bits)``, every other argument at the class default
    (``symmetric``: pass ``is_symmetric`` too, as its command-line script does)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    extra = {} if symmetric is None else {"is_symmetric": symmetric, "block_size": 128}
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, **extra)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))
    return sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in quantizer.model.model.graph.node)


def measure(case: Case, src: Path, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    from ox_quant.verification.verify import verify

    report = verify(src, path, inputs=feeds)
    first = report.outputs[0]
    return {"bytes": model_bytes(path), "sqnr_db": first.sqnr_db, "output": first.name,
            "metrics": {k: float(v) for k, v in case.score(path).items()}}


def run_case(case: Case, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    log(f"{case.name}: fp32")
    src = case.build(work)
    feeds = case.feeds(src)
    rows = [{"tool": "fp32", "bits": 32, "weights": 0, **measure(case, src, src, feeds)}]
    for bits in (4, 8):
        for tool in TOOLS:
            if tool == TOOLS[6] and bits != 4:
                continue
            out = work / f"{case.name}.{bits}.{TOOLS.index(tool)}.onnx"
            log(f"{case.name}: int{bits} {tool}")
            t0 = time.perf_counter()
            if tool in PEERS:
                count = ort_default(src, out, bits, PEERS[tool] if tool != "ORT default" else None)
            else:
                count = ox_quant(src, out, bits, tool)
            seconds = time.perf_counter() - t0
            rows.append({"tool": tool, "bits": bits, "weights": count, "convert_seconds": round(seconds, 2),
                         **measure(case, src, out, feeds)})
            for p in (out, out.with_name(out.name + ".data")):
                p.unlink(missing_ok=True)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return {"model": case.name, "architecture": case.architecture, "metric": case.metric,
            "higher_is_better": case.higher_is_better, "metric_note": case.metric_note, "inputs": shapes,
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------ report


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def verdict(result: dict[str, Any], ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """``yes`` when ours is at least as accurate (SQNR and metric) at equal or smaller size; else why not."""
    why = []
    if ours["sqnr_db"] < peer["sqnr_db"] - 0.005:
        why.append(f"SQNR {ours['sqnr_db'] - peer['sqnr_db']:+.2f} dB" if math.isfinite(peer["sqnr_db"])
                   else "SQNR < inf (ORT quantized nothing)")
    a, b = ours["metrics"][result["metric"]], peer["metrics"][result["metric"]]
    worse = a < b if result["higher_is_better"] else a > b
    if worse and abs(a - b) > METRIC_TOLERANCE:
        why.append(f"{result['metric']} {_fmt(a)} vs {_fmt(b)}")
    if ours["bytes"] > peer["bytes"] * (1 + SIZE_TOLERANCE):
        why.append(f"size x{ours['bytes'] / peer['bytes']:.2f}")
    extra = ours["bytes"] - peer["bytes"]
    note = f" (+{extra} B)" if extra > 0 and not why else ""
    return ("yes" + note) if not why else "no: " + ", ".join(why)


def summary(results: list[dict[str, Any]]) -> list[str]:
    """Counted from the rows: where ox-quant's default is (not) at least ORT's."""
    passed, failed = 0, []
    for r in results:
        for bits in (4, 8):
            peer = next(x for x in r["rows"] if x["tool"] == "ORT default" and x["bits"] == bits)
            ours = next(x for x in r["rows"] if x["tool"] == "ox-quant default" and x["bits"] == bits)
            v = verdict(r, ours, peer)
            if v.startswith("yes"):
                passed += 1
            else:
                failed.append(f"{r['model']} int{bits} ({v[4:]})")
    out = [f"**ox-quant's default is at least ORT's default, at equal or smaller size, on {passed} of "
           f"{passed + len(failed)} rows.**" + (" Not on: " + "; ".join(failed) + "." if failed else ""), ""]
    return out


def render(results: list[dict[str, Any]], command: str, env: dict[str, str]) -> str:
    lines = [
        "# Defaults against ONNX Runtime's quantizer",
        "",
        "Written by `tools/compare_defaults.py` (every number measured by it; nothing typed in):",
        "",
        f"```\n{command}\n```",
        "",
        "- **ox-quant default**: `ox-quant convert MODEL --bits B` (MatMul at B bits, blocks of 128 along K,",
        "  asymmetric; Gemm and Conv weights and embedding tables, tied ones included, left float).",
        "- **ORT default** (the reference): `MatMulNBitsQuantizer(model, bits=B)` of onnxruntime "
        f"{env.get('onnxruntime', '?')}, every other argument at the *class* default: block_size 128, "
        "is_symmetric False, QOperator (MatMulNBits), MatMul weights only.",
        "- **ORT CLI default**: the defaults of its command-line script "
        "(`python -m onnxruntime.quantization.matmul_nbits_quantizer`): symmetric, block 32, here with block 128.",
        "- **ox-quant --symmetric**: the symmetric alternative (no zero points; `--symmetric-rule` at its default).",
        "- **ox-quant + Gemm**: `--gemm-bits bits`, Gemm weights quantized like MatMul ones (ORT leaves them float).",
        "- **ox-quant + int8 Conv/embeddings**: `--conv-bits 8 --embedding-bits 8` (Conv per output channel,",
        "  tables in blocks of 128); **+ int4 Conv/embeddings**: `--conv-bits 4 --embedding-bits 4`, what every",
        "  weight got before the policy (all followed `--bits`). These rows are the measurement behind the policy.",
        "",
        "SQNR: of the first model output against the fp32 ONNX (`ox-quant verify`'s metric) on the task inputs",
        "listed per model; the task metric as noted. \"≥ ORT\": the row is at least as accurate as ORT's default",
        "(SQNR within 0.005 dB or higher, task metric within 1e-5 or better) at equal or smaller size (sizes within 0.1 %",
        "count as equal; the extra bytes are shown: ox-quant keeps the source's `value_info` shape annotations,",
        "which ORT's quantizer drops). \"≥ ORT CLI\": the same test against the ORT CLI default row.",
        "",
    ]
    lines += ["## Policy", "",
              "`ox-quant convert` quantizes MatMul weights at `--bits` (asymmetric, blocks of 128 along K) and",
              "leaves Gemm and Conv weights and embedding tables float unless `--gemm-bits` / `--conv-bits` /",
              "`--embedding-bits` ask",
              "(`ox_quant/pipeline/policy.py`). The rows below are why: 4-bit Conv and tables break models, and int8 ones,",
              "though close on the task metrics, lower the output SQNR below ORT's default, which leaves them float.",
              "The symmetric rule (`--symmetric`) falls below ORT's asymmetric default on some rows, so the default",
              "is asymmetric, the same codes as ORT's quantizer (tests/test_peer_ort_quantizer.py). Gemm weights",
              "stay float, as ORT's quantizer (MatMul only) leaves them: quantized (`ox-quant + Gemm` rows), CREPE's",
              "Gemm classifier makes the file smaller but the pitch less accurate than ORT's output. A model whose",
              "weights all sit in Gemm nodes (a GPT-2 exported with Gemm) is therefore left float by default, as by",
              "ORT, and the summary names `--gemm-bits bits`.", ""]
    lines += summary(results)
    for r in results:
        rows = r["rows"]
        fp32 = rows[0]
        arrow = "higher is better" if r["higher_is_better"] else "lower is better"
        lines += [f"## {r['model']}: {r['architecture']}", "",
                  f"Inputs: {', '.join(f'`{k}` {v}' for k, v in r['inputs'].items())}. "
                  f"Task metric `{r['metric']}`: {r['metric_note']} ({arrow}). fp32: {_size(fp32['bytes'])}, "
                  f"{r['metric']} {_fmt(fp32['metrics'][r['metric']])}.", "",
                  f"| bits | tool | weights | size | SQNR dB | {r['metric']} | ≥ ORT at ≤ size | ≥ ORT CLI at ≤ size |",
                  "|---|---|---|---|---|---|---|---|"]
        for bits in (4, 8):
            peer = next(x for x in rows if x["tool"] == "ORT default" and x["bits"] == bits)
            cli_peer = next((x for x in rows if x["tool"] == "ORT CLI default" and x["bits"] == bits), None)
            for x in rows:
                if x["bits"] != bits:
                    continue
                mark = "" if x["tool"] in PEERS else verdict(r, x, peer)
                mark_cli = "" if x["tool"] in PEERS or cli_peer is None else verdict(r, x, cli_peer)
                lines.append(f"| int{bits} | {x['tool']} | {x['weights']} | {_size(x['bytes'])} | {_fmt(x['sqnr_db'])} "
                             f"| {_fmt(x['metrics'][r['metric']])} | {mark} | {mark_cli} |")
        lines.append("")
    lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "defaults.md")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--report-only", action="store_true", help="re-render the table from <out>.json")
    args = parser.parse_args(argv)
    data_path = args.out.with_suffix(".json")
    command = "PYTHONPATH=. python3 tools/compare_defaults.py --out docs/defaults.md"
    if args.report_only:
        data = json.loads(data_path.read_text())
    else:
        names = [m for m in args.models.split(",") if m]
        unknown = [m for m in names if m not in CASES]
        if unknown:
            print(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(CASES)}", file=sys.stderr)
            return 1
        old = json.loads(data_path.read_text())["results"] if data_path.exists() else []
        results = {r["model"]: r for r in old}
        for name in names:
            with tempfile.TemporaryDirectory(prefix="compare-defaults-") as tmp:
                results[name] = run_case(CASES[name], Path(tmp), lambda s: print(s, file=sys.stderr, flush=True))
            data = {"command": command, "environment": environment(),
                    "results": [results[n] for n in CASES if n in results]}
            data_path.write_text(json.dumps(data, indent=1) + "\n")
    args.out.write_text(render(data["results"], data["command"], data["environment"]))
    print(f"wrote {args.out} and {data_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
