"""``ox-quant bench MODEL [--compare OTHER...]``: prefill / decode speed and peak memory, or latency."""

from __future__ import annotations

import json

import click


@click.command("bench")
@click.argument("model")
@click.option("--compare", "others", multiple=True, metavar="OTHER", help="Another model to measure with the same settings (repeatable); ratios are to MODEL.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True, help="LLM folders: prompt tokens of the prefill.")
@click.option("--gen", type=click.IntRange(min=1), default=32, show_default=True, help="LLM folders: decode steps timed after the prefill.")
@click.option("--seq", type=click.IntRange(min=1), default=16, show_default=True, help="Other models: size of every non-batch symbolic axis.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads (default: ORT's choice).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(model: str, others: tuple[str, ...], batch: int, prompt_len: int, gen: int, seq: int,
              threads: int | None, provider: str, warmup: int, repeats: int, as_json: bool) -> None:
    """Measure MODEL (an LLM folder: prefill ms, decode tokens/s; an .onnx file: latency ms) on
    ONNX Runtime. Each model runs in a child process of its own, one after another, so that its
    peak resident memory (peak_rss_mib, the whole process) is its own."""
    from ox_quant.evaluation.bench import BenchSettings, bench

    settings = BenchSettings(batch=batch, prompt_len=prompt_len, gen=gen, threads=threads, provider=provider,
                             warmup=warmup, repeats=repeats, seq=seq)
    results = [bench(m, settings) for m in (model, *others)]
    base = results[0]
    for r in results[1:]:
        r["ratios"] = _ratios(r, base)
    if as_json:
        payload = {"settings": settings.__dict__, **base} if not others else {
            "settings": settings.__dict__, "models": results}
        click.echo(json.dumps(payload))
        return
    for r in results:
        line = f"{r['model']}: "
        if r["kind"] == "llm":
            p, d = r["prefill_ms_spread"], r["decode_tokens_per_s_spread"]
            line += (f"prefill {r['prefill_ms']:.1f} ms (IQR {p['p25']:.1f}-{p['p75']:.1f}), decode "
                     f"{r['decode_tokens_per_s']:.1f} tokens/s (IQR {d['p25']:.1f}-{d['p75']:.1f})")
        else:
            t = r["latency_ms_spread"]
            line += f"latency {r['latency_ms']:.2f} ms (IQR {t['p25']:.2f}-{t['p75']:.2f})"
        line += f", peak RSS {r['peak_rss_mib']:.0f} MiB (before load {r['rss_before_load_mib']:.0f})"
        if "ratios" in r:
            line += "; vs first: " + ", ".join(f"{k} x{v:.2f}" for k, v in r["ratios"].items())
        click.echo(line)


def _ratios(r: dict, base: dict) -> dict[str, float]:
    keys = ("prefill_ms", "decode_tokens_per_s", "peak_rss_mib") if r["kind"] == "llm" == base["kind"] else (
        ("latency_ms", "peak_rss_mib") if r["kind"] == base["kind"] else ("peak_rss_mib",))
    return {k: r[k] / base[k] for k in keys if base.get(k)}
