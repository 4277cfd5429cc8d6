"""magika's file-type classifier (ONNX only), from the PyPI package ``magika`` (``--no-deps``).

The model maps ``bytes [B, 2048] int32`` -- the first 1024 and the last 1024 bytes of a
file, each read from at most 4096 bytes and stripped of leading (trailing) whitespace,
padded with token 256 -- to ``target_label [B, 214]`` class probabilities
(``config.min.json``). Its weights: one Conv ``[512, 256, 5, 1]``, two MatMuls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ox_quant_models._locate import package_file

DIST = "magika"
MODULE = "magika"
MODEL_DIR = "models/standard_v3_3"
BEG_SIZE = END_SIZE = 1024
BLOCK_SIZE = 4096
PADDING = 256


def onnx_path() -> Path:
    """The package's model, as shipped."""
    return package_file(DIST, MODULE, f"{MODEL_DIR}/model.onnx")


def labels() -> list[str]:
    """Class index -> content-type label."""
    config = json.loads(package_file(DIST, MODULE, f"{MODEL_DIR}/config.min.json").read_text())
    return list(config["target_labels_space"])


def features(content: bytes) -> np.ndarray:
    """``int32 [2048]``: beg (left-stripped, right-padded) + end (right-stripped, left-padded)."""
    head = content[:BLOCK_SIZE].lstrip()[:BEG_SIZE]
    tail = content[-BLOCK_SIZE:].rstrip()[-END_SIZE:] if content else b""
    beg = list(head) + [PADDING] * (BEG_SIZE - len(head))
    end = [PADDING] * (END_SIZE - len(tail)) + list(tail)
    return np.asarray(beg + end, dtype=np.int32)


def read_features(paths: list[str | os.PathLike]) -> np.ndarray:
    """``int32 [len(paths), 2048]`` for the files ``paths``."""
    return np.stack([features(Path(p).read_bytes()) for p in paths])
