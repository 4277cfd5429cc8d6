"""``ox-quant generate DIR --prompt TEXT``: decode with the key-value cache on ONNX Runtime, streaming."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ox_quant.errors import OxQuantError


def load_tokenizer(folder):
    """``tokenizers.Tokenizer`` from the folder's tokenizer.json; one-line errors when absent."""
    if not folder.tokenizer.is_file():
        raise OxQuantError(f"{folder.path} has no tokenizer.json: generate needs the model's tokenizer beside it")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OxQuantError("the tokenizers package is not installed (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(str(folder.tokenizer))
    except Exception as exc:
        raise OxQuantError(f"{folder.tokenizer}: not a tokenizer.json ({exc})") from exc


@click.command("generate")
@click.argument("model", metavar="DIR_OR_MODEL")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--greedy", is_flag=True, help="Always the most likely token (the default unless --temperature/--top-k are given).")
@click.option("--temperature", type=float, default=None, help="Sample from softmax(logits / T).")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Sample among the K most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--ids", "show_ids", is_flag=True, help="Print the generated token ids (one line) instead of text.")
def generate_cmd(model: str, prompt: str, max_new_tokens: int, greedy: bool, temperature: float | None,
                 top_k: int | None, seed: int, provider: str, threads: int | None, show_ids: bool) -> None:
    """Continue PROMPT with the LLM folder DIR (from `ox-quant export NAME --kv-cache`, or
    converted; or its model.onnx), decoding token by token with its key-value cache; text streams to stdout."""
    from ox_quant.runtime.decode import CachedDecoder, Sampling
    from ox_quant.runtime.llm_folder import is_llm_folder, read_folder

    if greedy and (temperature is not None or top_k is not None):
        raise OxQuantError("--greedy excludes --temperature and --top-k")
    sampling = Sampling() if greedy or (temperature is None and top_k is None) else Sampling(
        greedy=False, temperature=1.0 if temperature is None else temperature, top_k=top_k or 0, seed=seed)
    target = Path(model)
    if target.is_file() and is_llm_folder(target.parent):  # DIR/model.onnx: the folder beside it
        target = target.parent
    folder = read_folder(target)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if len(prompt_ids) >= folder.context_length:
        raise OxQuantError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                           f"{folder.context_length} tokens")
    decoder = CachedDecoder(folder, provider=provider, threads=threads)
    tokens: list[int] = []
    shown = ""
    for token in decoder.generate(prompt_ids, max_new_tokens, sampling):
        tokens.append(token)
        if show_ids:
            continue
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            continue
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    if show_ids:
        click.echo(" ".join(str(t) for t in tokens))
    else:
        sys.stdout.write("\n")
