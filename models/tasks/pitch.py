"""CREPE task: pitch accuracy on synthetic harmonic tones.

Tones: ``TONES`` fundamentals log-spaced over [``F_LOW``, ``F_HIGH``] Hz, each a sum of
4 harmonics (amplitude 1/k, seeded random phases) plus white noise 30 dB below the
signal, sampled at 16 kHz; ``FRAMES_PER_TONE`` 1024-sample frames per tone at seeded
random offsets, each normalised to mean 0, std 1. The estimate of a frame is CREPE's
local average: ``c = sum_i a_i c_i / sum_i a_i`` over bins within 4 of the arg-max, with
``c_i = 1997.38 + 20 i`` cents above 10 Hz. Error = ``1200 log2(f_est / f_true)`` cents.

Metrics: ``raw_pitch_accuracy`` (fraction of frames within 50 cents; primary),
``cents_error_mean``, ``cents_error_max`` (absolute), ``confidence_mean`` (peak activation).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ox_quant.evaluation.tasks import Progress, TaskResult, no_progress, runner_for, target_label
from ox_quant_models import crepe

TONES = 16
FRAMES_PER_TONE = 4
F_LOW, F_HIGH = 55.0, 1400.0
HARMONICS = 4
SNR_DB = 30.0
SEED = 20240605
CORRECT_CENTS = 50.0


def tones(count: int = TONES, frames_per_tone: int = FRAMES_PER_TONE, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(frames float32 [count * frames_per_tone, 1024] normalised, f0 float64 [same])``."""
    rng = np.random.default_rng(seed)
    f0s = np.geomspace(F_LOW, F_HIGH, count)
    frames, truth = [], []
    for f0 in f0s:
        length = crepe.SAMPLE_RATE  # one second to cut frames from
        t = np.arange(length) / crepe.SAMPLE_RATE
        signal = np.zeros(length)
        for k in range(1, HARMONICS + 1):
            if k * f0 < crepe.SAMPLE_RATE / 2:
                signal += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
        noise_std = np.sqrt(signal.var() / 10 ** (SNR_DB / 10))
        signal += rng.normal(0.0, noise_std, length)
        for start in rng.integers(0, length - crepe.WINDOW, frames_per_tone):
            frame = signal[start:start + crepe.WINDOW]
            frame = frame - frame.mean()
            frames.append(frame / max(frame.std(ddof=1), 1e-10))
            truth.append(f0)
    return np.asarray(frames, dtype=np.float32), np.asarray(truth)


def decode_cents(activations: np.ndarray, radius: int = 4) -> np.ndarray:
    """Local weighted average of bin cents around the arg-max: ``[B, 360] -> [B]``."""
    bins = np.arange(crepe.PITCH_BINS)
    cents = crepe.CENTS_OFFSET + crepe.CENTS_PER_BIN * bins
    peak = activations.argmax(-1)
    window = np.abs(bins[None, :] - peak[:, None]) <= radius
    weights = np.where(window, activations.astype(np.float64), 0.0)
    return (weights * cents).sum(-1) / np.maximum(weights.sum(-1), 1e-12)


def evaluate(target: Any = None, *, provider: str = "cpu", exact: bool = True,
             progress: Progress = no_progress) -> TaskResult:
    """Pitch accuracy of ``target`` (None = fp32 torch CREPE tiny, a module, or an ONNX path)."""
    start = time.perf_counter()
    frames, f0 = tones()
    runner = runner_for(target, crepe.load, crepe.INPUT_NAMES, provider, exact)
    progress(0, 1, f"{len(frames)} frames")
    activations = runner({"frames": frames})[0]
    progress(1, 1, "done")
    est_cents = decode_cents(activations)
    err = np.abs(est_cents - 1200 * np.log2(f0 / 10.0))
    return TaskResult(
        task="crepe-tiny",
        model=target_label(target, "crepe-tiny (fp32 torch)"),
        backend=runner.backend,
        primary="raw_pitch_accuracy",
        metrics={
            "raw_pitch_accuracy": float((err <= CORRECT_CENTS).mean()),
            "cents_error_mean": float(err.mean()),
            "cents_error_max": float(err.max()),
            "confidence_mean": float(activations.max(-1).mean()),
        },
        details={"tones": TONES, "frames": len(frames), "f0_range_hz": [F_LOW, F_HIGH], "snr_db": SNR_DB},
        seconds=time.perf_counter() - start,
    )
