"""Speed and memory of one model on ONNX Runtime: LLM folders and plain ONNX files.

Each model is measured in a child process of its own (``python -c ... child_main``), so that
``peak_rss_mib`` is that model's whole-process peak resident set (``ru_maxrss`` of the child,
from ``os.wait4``), with ``rss_before_load_mib`` the child's resident set after imports and
before the session is created. Nothing here asserts a speed; the figures are what this
machine gave.

* LLM folder (``genai_config.json``): ``prefill_ms`` = one step on ``[batch, prompt_len]``
  random tokens with an empty cache; ``decode_tokens_per_s = batch * gen / t`` where ``t``
  is the time of ``gen`` single-token steps after that prefill (greedy on the logits).
* other ONNX file: ``latency_ms`` of one run on inputs from ``ox_quant.verification.inputs``
  (symbolic axes named like ``batch`` -> ``batch``, every other symbolic axis -> ``seq``).

Every figure: ``warmup`` untimed runs, then ``repeats`` timed ones; the median, the 25th and
75th percentiles and the minimum are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ox_quant.errors import OxQuantError


@dataclass(frozen=True)
class BenchSettings:
    batch: int = 1
    prompt_len: int = 128
    gen: int = 32
    threads: int | None = None
    provider: str = "cpu"
    warmup: int = 1
    repeats: int = 5
    seq: int = 16
    """Non-LLM models: size of every symbolic axis that is not a batch axis."""


def summary(values: list[float]) -> dict[str, float]:
    """``median, p25, p75, min, max`` of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75)),
            "min": float(a.min()), "max": float(a.max())}


def _rss_mib() -> float:
    """Resident set of this process now (``VmRSS``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_llm(folder_path: str, s: BenchSettings) -> dict[str, Any]:
    """Prefill and decode figures of an LLM folder (in this process)."""
    from ox_quant.runtime.decode import CachedDecoder
    from ox_quant.runtime.llm_folder import read_folder

    folder = read_folder(folder_path)
    if s.prompt_len + s.gen > folder.context_length:
        raise OxQuantError(f"--prompt-len {s.prompt_len} + --gen {s.gen} exceed the context of {folder.context_length}")
    before = _rss_mib()
    decoder = CachedDecoder(folder, provider=s.provider, threads=s.threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, folder.vocab_size, (s.batch, s.prompt_len)).astype(np.int64)
    prefill, decode = [], []
    for i in range(s.warmup + s.repeats):
        start = time.perf_counter()
        logits, cache = decoder.step(prompt, decoder.empty_cache(s.batch))
        mid = time.perf_counter()
        for _ in range(s.gen):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            logits, cache = decoder.step(token, cache)
        end = time.perf_counter()
        if i >= s.warmup:
            prefill.append((mid - start) * 1e3)
            decode.append(s.batch * s.gen / (end - mid))
    p, d = summary(prefill), summary(decode)
    return {"kind": "llm", "prefill_ms": p["median"], "prefill_ms_spread": p,
            "decode_tokens_per_s": d["median"], "decode_tokens_per_s_spread": d,
            "rss_before_load_mib": before, "file_bytes": _folder_model_bytes(folder.model)}


def _folder_model_bytes(model: Path) -> int:
    from ox_quant.runtime.llm_folder import model_external_files

    return model.stat().st_size + sum(f.stat().st_size for f in model_external_files(model) if f.is_file())


def measure_onnx(model: str, s: BenchSettings) -> dict[str, Any]:
    """Latency of one run of an ONNX file at the settings' shapes (in this process)."""
    from ox_quant.runtime.session import make_session
    from ox_quant.verification.inputs import generate_inputs, input_specs, load_graph

    graph = load_graph(model)
    dims = {}
    for spec in input_specs(graph):
        for d in spec.shape:
            if isinstance(d, str):
                dims[d] = s.batch if "batch" in d.lower() else s.seq
    if "total_sequence" in dims:  # a cache model run as a plain graph: mask over past + new tokens
        dims["total_sequence"] = dims.get("past_sequence", 0) + dims.get("sequence", 0)
    feeds = generate_inputs(graph, dims=dims)
    before = _rss_mib()
    session = make_session(model, provider=s.provider, threads=s.threads)
    times = []
    for i in range(s.warmup + s.repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        if i >= s.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    t = summary(times)
    return {"kind": "onnx", "latency_ms": t["median"], "latency_ms_spread": t, "rss_before_load_mib": before,
            "shapes": {k: list(v.shape) for k, v in feeds.items()}, "file_bytes": Path(model).stat().st_size}


def measure(model: str, s: BenchSettings) -> dict[str, Any]:
    from ox_quant.runtime.llm_folder import is_llm_folder

    if is_llm_folder(model):
        return measure_llm(model, s)
    if not Path(model).is_file():
        raise OxQuantError(f"{model}: neither an LLM folder (with genai_config.json) nor an ONNX file")
    return measure_onnx(model, s)


def child_main() -> None:
    """Child side of ``bench``: settings and model as JSON on stdin, figures as JSON on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        result = measure(request["model"], BenchSettings(**request["settings"]))
    except OxQuantError as exc:
        result = {"error": str(exc)}
    sys.stdout.write(json.dumps(result))


def bench(model: str, settings: BenchSettings) -> dict[str, Any]:
    """``measure`` in a child process, plus its ``peak_rss_mib``. ``OxQuantError`` on failure."""
    if not Path(model).exists():
        raise OxQuantError(f"{model} does not exist")
    proc = subprocess.Popen([sys.executable, "-c", "from ox_quant.evaluation.bench import child_main; child_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps({"model": str(model), "settings": asdict(settings)}))
    proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise OxQuantError(f"benchmarking {model} failed (exit {proc.returncode}): {last}")
    result = json.loads(out)
    if "error" in result:
        raise OxQuantError(result["error"])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["model"] = str(model)
    return result
