"""MiniLM task: how close a model's sentence embeddings stay to the fp32 reference.

On the project's paraphrase set (``models/tasks/sentences.py``, S sentences):

- ``cosine_mean`` / ``cosine_min``: cosine between each sentence's embedding and the
  fp32 torch embedding of the same sentence (primary: ``cosine_mean``).
- ``spearman_mean``: for each sentence, Spearman rank correlation between its
  similarities to the other S-1 sentences under the candidate and under fp32; averaged.
- ``top1_agreement``: fraction of sentences whose most similar other sentence is the
  same as under fp32.
- ``paraphrase_top1``: fraction of sentences whose most similar other sentence is its
  paraphrase partner (an absolute score, fp32 included).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ox_quant.evaluation.tasks import Progress, Runner, TaskResult, no_progress, runner_for, target_label
from ox_quant_models import minilm
from ox_quant_models.tasks.sentences import sentences


def embed(runner: Runner, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Unit-norm sentence embeddings ``[S, H]``; pools ``[S, T, H]`` hidden-state outputs."""
    out = runner(feeds)[0]
    if out.ndim == 3:
        out = minilm.pool_numpy(out, feeds["attention_mask"])
    out = out.astype(np.float64)
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of ``[S, M]`` score matrices (no ties expected)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))


def _off_diagonal(sim: np.ndarray) -> np.ndarray:
    """``[S, S] -> [S, S-1]``: each row without its self-similarity."""
    s = sim.shape[0]
    return sim[~np.eye(s, dtype=bool)].reshape(s, s - 1)


def compare(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Metrics of candidate embeddings ``[S, H]`` against reference ``[S, H]`` (both unit-norm)."""
    s = candidate.shape[0]
    cos = (candidate * reference).sum(-1)
    sim_c = _off_diagonal(candidate @ candidate.T)
    sim_r = _off_diagonal(reference @ reference.T)
    partner = np.arange(s) ^ 1  # 2i <-> 2i+1
    nearest = np.argmax(candidate @ candidate.T - 2 * np.eye(s), axis=-1)
    nearest_ref = np.argmax(reference @ reference.T - 2 * np.eye(s), axis=-1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "spearman_mean": float(_spearman_rows(sim_c, sim_r).mean()),
        "top1_agreement": float((nearest == nearest_ref).mean()),
        "paraphrase_top1": float((nearest == partner).mean()),
    }


def evaluate(target: Any = None, *, provider: str = "cpu", exact: bool = True,
             progress: Progress = no_progress,
             reference: np.ndarray | None = None) -> TaskResult:
    """Score ``target`` (None = fp32 torch MiniLM, a module, or an ONNX path).

    ``reference``: precomputed fp32 embeddings ``[S, 384]`` of :func:`sentences` (else computed).
    """
    start = time.perf_counter()
    texts = sentences()
    feeds = minilm.encode(texts)
    progress(0, 2, "reference embeddings")
    if reference is None:
        reference = embed(runner_for(None, minilm.load, minilm.INPUT_NAMES), feeds)
    progress(1, 2, "candidate embeddings")
    runner = runner_for(target, minilm.load, minilm.INPUT_NAMES, provider, exact)
    candidate = embed(runner, feeds)
    progress(2, 2, "done")
    return TaskResult(
        task="minilm",
        model=target_label(target, "minilm (fp32 torch)"),
        backend=runner.backend,
        primary="cosine_mean",
        metrics=compare(candidate, reference),
        details={"sentences": len(texts), "max_tokens": int(feeds["input_ids"].shape[1])},
        seconds=time.perf_counter() - start,
    )


def study_extras() -> dict[str, Any]:
    """Options computed once per study: the fp32 torch reference embeddings."""
    from ox_quant.evaluation.tasks import TorchRunner

    return {"reference": embed(TorchRunner(minilm.load(), minilm.INPUT_NAMES), minilm.encode(sentences()))}
