"""``reshape_keep``: ONNX ``Reshape`` semantics in eager PyTorch (0 keeps, -1 infers), exported
by TorchScript as one ``Reshape`` with a constant shape that ONNX Runtime runs at other sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ox_quant_models.onnx_reshape import reshape_keep


def _onnx_reshape_reference(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The ONNX rule, spelled out: 0 copies the input's size at that index, -1 takes the rest."""
    sizes = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = x.size // known
    return x.reshape(sizes)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(0, 4), h=st.integers(1, 4), d=st.sampled_from([2, 4, 8]))
def test_eager_equals_the_onnx_rule(b, t, h, d):
    x = torch.arange(b * t * h * d, dtype=torch.float32).reshape(b, t, h * d)
    for shape in [(0, -1, h, d), (0, 0, h * d)]:
        got = reshape_keep(x, shape).numpy()
        np.testing.assert_array_equal(got, _onnx_reshape_reference(x.numpy(), shape))


def test_rejects_two_inferred_sizes():
    with pytest.raises(ValueError, match="not valid"):
        reshape_keep(torch.zeros(2, 3, 4), (0, -1, -1))


def test_exports_one_reshape_with_a_constant_shape(tmp_path):
    import onnxruntime as ort

    class Split(torch.nn.Module):
        def forward(self, x):
            return reshape_keep(x + 1, (0, -1, 3, 8)).transpose(1, 2)

    path = tmp_path / "r.onnx"
    torch.onnx.export(Split(), (torch.randn(2, 5, 24),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 1: "t"}})
    graph = onnx.load(str(path)).graph
    assert sorted(n.op_type for n in graph.node) == ["Add", "Constant", "Constant", "Reshape", "Transpose"] or \
        sorted(n.op_type for n in graph.node if n.op_type != "Constant") == ["Add", "Reshape", "Transpose"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, t in [(1, 7), (3, 0)]:
        x = np.random.default_rng(0).standard_normal((b, t, 24)).astype(np.float32)
        (got,) = session.run(None, {"x": x})
        np.testing.assert_array_equal(got, (x + 1).reshape(b, t, 3, 8).transpose(0, 2, 1, 3))
