"""A reshape that exports as one ONNX ``Reshape`` with a constant shape.

``x.view(b, t, h, d)`` with ``b, t`` read from a tensor's shape traces, in the TorchScript
exporter, to ``Shape -> Gather -> Unsqueeze -> Concat`` per dynamic dimension before the
``Reshape``: on a decoder step those chains outnumber the matrix products. ONNX's ``Reshape``
already says "keep this dimension" with a ``0`` entry and "infer this one" with ``-1``, so the
shape can be a constant whatever the batch and sequence sizes are.
"""

from __future__ import annotations

import torch


class _KeepReshape(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        sizes = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(sizes)

    @staticmethod
    def symbolic(g, x, shape: tuple[int, ...]):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(list(shape), dtype=torch.int64)))


def reshape_keep(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` reshaped to ``shape`` with ONNX's rules: ``0`` keeps ``x``'s size at that position,
    ``-1`` (at most one) takes what is left. Eager, dynamo and TorchScript agree; TorchScript
    writes a single ``Reshape`` whose shape input is the constant ``shape``. A shape with a
    ``0`` that splits a dimension needs a ``-1`` too (TorchScript's shape inference asserts
    on ``(0, 0, h, d)`` behind dynamic dimensions), and the ``-1`` belongs where a size may be 0 (a zero-token step):
    ``(0, -1, h, d)`` splits ``[B, T, h*d]`` at ``T = 0``, ``(0, 0, -1, d)`` cannot (ONNX
    Runtime infers no ``-1`` beside a 0-sized dimension)."""
    if sum(s == -1 for s in shape) > 1 or any(s == 0 and i >= x.dim() for i, s in enumerate(shape)):
        raise ValueError(f"reshape_keep: shape {shape} is not valid for a {x.dim()}-d input")
    return _KeepReshape.apply(x, tuple(int(s) for s in shape))
