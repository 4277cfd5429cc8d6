"""Helpers for the real-model tests: skip when a model package is missing, quantize with the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ox_quant_models._locate import is_installed

REPO = Path(__file__).resolve().parent.parent


def require(module: str, dist: str) -> pytest.MarkDecorator:
    """Skip unless the model package ``dist`` (import name ``module``) is installed."""
    return pytest.mark.skipif(
        not is_installed(module),
        reason=f"model package {dist} is not installed (run tools/setup_models.sh)",
    )


def ox_quant(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``ox-quant`` CLI of this checkout in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "ox_quant.cli", *args], cwd=REPO,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"ox-quant {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def convert_int8_per_channel(src: Path, dst: Path) -> dict:
    """``ox-quant convert SRC -o DST --bits 8 --block-size -1 --format qdq --conv-bits bits
    --embedding-bits bits --json`` (every weight, Conv and tables too) -> its report."""
    proc = ox_quant("convert", str(src), "-o", str(dst), "--bits", "8", "--block-size", "-1",
                    "--format", "qdq", "--conv-bits", "bits", "--embedding-bits", "bits", "--json")
    report = json.loads(proc.stdout)
    assert report["quantized"], f"nothing was quantized in {src.name}: {report['skipped']}"
    return report
