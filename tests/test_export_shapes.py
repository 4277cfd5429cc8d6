"""Export at a second shape: inferred axes for encoder-decoder, audio and past-key-value
inputs, batch-1 traps named with their fix, and exporter failures told in one line.

Every exported model is run here by ONNX Runtime at batch 3 and another sequence length
than its batch-1 example, against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ox_quant.errors import OxQuantError
from ox_quant.export.axes import infer_axes, resize, second_sizes
from ox_quant.export.exporter import export_model, parse_dynamic_axis
from ox_quant.export.log import ExportError, exporter_reason
from ox_quant_models import toy_shapes
from tests.verify_support import assert_one_line_error, run_cli


def _dims(path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }


def _ort_vs_torch(path, module, inputs) -> float:
    """Lowest SQNR (dB) of ONNX Runtime against PyTorch over all outputs at ``inputs``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)})
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = np.inf
    for r, g in zip(ref, got, strict=True):
        r = r.numpy().astype(np.float64)
        assert r.shape == g.shape
        noise = float(np.sum((r - g) ** 2))
        worst = min(worst, np.inf if noise == 0 else 10 * np.log10(float(np.sum(r**2)) / noise))
    return worst


def _ids(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, toy_shapes.VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _axes(report) -> dict[tuple[str, int], str | None]:
    return {(c.input, c.axis): c.name for c in report.axes}


# ------------------------------------------------------------------ batch-1 traps


def test_batch_one_branch_fails_naming_the_axis(tmp_path):
    """PyTorch runs at any batch, but the export traced at batch 1 keeps the ``B == 1``
    reshape: the check at batch 3 names the axis and its fixes, and nothing is written."""
    module, inputs = toy_shapes.batch_one_fast_path()
    for dynamo in (True, False):
        with pytest.raises(ExportError) as info:
            export_model(module, inputs, tmp_path / "m.onnx", dynamo=dynamo)
        message = str(info.value)
        assert message.startswith("input_ids[0]=batch: the exported model ")
        assert "at batch=3 (exported at 1)" in message
        assert "--static-axis input_ids:0" in message and "example with batch >= 2" in message
        assert ("disagrees with PyTorch" if dynamo else "does not run") in message
        assert list(tmp_path.iterdir()) == []


def test_batch_one_branch_with_static_batch_passes(tmp_path):
    module, inputs = toy_shapes.batch_one_fast_path()
    report = export_model(module, inputs, tmp_path / "m.onnx", static_axes=["input_ids:0"])
    assert _dims(tmp_path / "m.onnx")["input_ids"] == [1, "sequence"]
    assert report.shape_check is not None and report.shape_check.sizes == {"sequence": 6}
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (_ids(1, 11),)) > 80
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # batch 3 is refused, as declared
        _ort_vs_torch(tmp_path / "m.onnx", module, (_ids(3, 11),))


def test_model_fixed_at_batch_one(tmp_path):
    """A model that itself only runs at batch 1: the inferred batch axis becomes static (and
    says why); declaring it dynamic is an error naming the axis."""
    module, inputs = toy_shapes.batch_one_reshape()
    report = export_model(module, inputs, tmp_path / "m.onnx", dynamo=False)
    batch = next(c for c in report.axes if (c.input, c.axis) == ("input_ids", 0))
    assert batch.name is None and "PyTorch fails at size 3" in batch.reason
    assert _dims(tmp_path / "m.onnx")["input_ids"] == [1, "sequence"]
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (_ids(1, 13),)) > 80
    declared = [parse_dynamic_axis("input_ids:0=batch"), parse_dynamic_axis("input_ids:1=sequence")]
    with pytest.raises(ExportError, match=r"^input_ids\[0\]=batch: the PyTorch model fails at batch=3"):
        export_model(module, inputs, tmp_path / "d.onnx", dynamic_axes=declared, dynamo=False)
    assert not (tmp_path / "d.onnx").exists()


class _FixedShape(torch.nn.Module):
    """Runs only at its example shape ``[1, 8]``: flattens the sequence into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(toy_shapes.VOCAB, 4)
        self.fc = torch.nn.Linear(8 * 4, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tok(input_ids).reshape(1, 8 * 4))


def test_every_axis_rejected_by_pytorch_is_static(tmp_path):
    module = _FixedShape().eval()
    report = export_model(module, (_ids(1, 8),), tmp_path / "m.onnx", dynamo=False)
    assert report.dynamic_axes == () and report.shape_check is None
    assert all("PyTorch fails at size" in c.reason for c in report.axes)
    assert _dims(tmp_path / "m.onnx")["input_ids"] == [1, 8]
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (_ids(1, 8, seed=11),)) > 80


# ------------------------------------------------------------------ inferred axes


def test_encoder_decoder_lengths_are_separate(tmp_path):
    module, inputs = toy_shapes.encoder_decoder()  # equal example lengths: only names tell them apart
    report = export_model(module, inputs, tmp_path / "m.onnx")
    assert _dims(tmp_path / "m.onnx") == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "decoder_input_ids": ["batch", "decoder_sequence"],
    }
    sizes = report.shape_check.sizes
    assert sizes["batch"] == 3 and sizes["sequence"] != sizes["decoder_sequence"]
    mask = torch.ones(3, 5, dtype=torch.int64)
    mask[1, 3:] = 0
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (_ids(3, 5), mask, _ids(3, 9, seed=8))) > 80


def test_audio_mel_bins_stay_static(tmp_path):
    module, inputs = toy_shapes.audio_encoder()
    report = export_model(module, inputs, tmp_path / "m.onnx")
    assert _dims(tmp_path / "m.onnx")["input_features"] == ["batch", 80, "frames"]
    assert "mel bins" in next(c.reason for c in report.axes if c.axis == 1)
    features = torch.randn(3, 80, 17, generator=torch.Generator().manual_seed(3))
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (features,)) > 80


def test_unnamed_rank3_input_is_settled_by_pytorch(tmp_path):
    """``x [1, 80, 12]`` says nothing by its name: PyTorch rejects 81 channels and accepts
    other lengths, so axis 1 is static and axis 2 dynamic."""
    module, inputs = toy_shapes.audio_encoder()
    report = export_model(module, inputs, tmp_path / "m.onnx", input_names=["x"], dynamo=False)
    axes = _axes(report)
    assert axes[("x", 1)] is None and axes[("x", 2)] == "x_length" and axes[("x", 0)] == "batch"
    assert "PyTorch fails" in next(c.reason for c in report.axes if c.axis == 1)
    features = torch.randn(3, 80, 5, generator=torch.Generator().manual_seed(4))
    assert _ort_vs_torch(tmp_path / "m.onnx", module, (features,)) > 80


def _kv_inputs(batch: int, new: int, past: int):
    generator = torch.Generator().manual_seed(9)
    cache = torch.randn(2, batch, toy_shapes.HEADS, past, toy_shapes.D // toy_shapes.HEADS, generator=generator)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    mask[0, :2] = 0  # left padding in the first row
    return _ids(batch, new), mask, cache[0], cache[1]


def test_past_key_values_axes(tmp_path):
    module, inputs = toy_shapes.past_key_values()
    report = export_model(module, inputs, tmp_path / "m.onnx")
    dims = _dims(tmp_path / "m.onnx")
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key"] == dims["past_value"] == ["batch", 2, "past_sequence", 8]
    sizes = report.shape_check.sizes
    assert set(sizes) == {"batch", "sequence", "past_sequence"} and sizes["batch"] == 3
    assert _ort_vs_torch(tmp_path / "m.onnx", module, _kv_inputs(3, 2, 5)) > 80
    assert _ort_vs_torch(tmp_path / "m.onnx", module, _kv_inputs(3, 1, 9)) > 80  # one decode step


def test_declared_past_key_values_axes(tmp_path):
    """Declared by hand, the mask's own symbol is recognised as past + current."""
    module, inputs = toy_shapes.past_key_values()
    axes = [parse_dynamic_axis(text) for text in (
        "input_ids:0=b", "input_ids:1=s", "attention_mask:0=b", "attention_mask:1=total",
        "past_key:0=b", "past_key:2=p", "past_value:0=b", "past_value:2=p",
    )]
    report = export_model(module, inputs, tmp_path / "m.onnx", dynamic_axes=axes, dynamo=False)
    assert _dims(tmp_path / "m.onnx")["attention_mask"] == ["b", "total"]
    assert report.shape_check is not None and set(report.shape_check.sizes) == {"b", "s", "p"}
    assert _ort_vs_torch(tmp_path / "m.onnx", module, _kv_inputs(3, 3, 4)) > 80


def test_second_sizes_are_distinct_and_keep_values_valid():
    plan = infer_axes(["input_ids", "decoder_input_ids"], [torch.zeros(1, 6, dtype=torch.int64)] * 2)
    sizes = second_sizes(plan)
    assert sizes["batch"] == 3 and len(set(sizes.values())) == len(sizes)
    assert not set(sizes.values()) & set(plan.example_sizes().values())
    ids = torch.tensor([[3, 9, 4, 1]])
    grown = resize(ids, (3, 6), seed=0)
    assert grown.shape == (3, 6) and set(grown.unique().tolist()) <= {1, 3, 4, 9}
    assert not torch.equal(grown[1], grown[0]) or not torch.equal(grown[2], grown[0])
    mask = torch.tensor([[0, 1, 1, 1]])
    assert set(resize(mask, (3, 3), seed=0).unique().tolist()) <= {0, 1}


# ------------------------------------------------------------------ failures in one line


def test_cache_object_gets_a_hint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "models.toy_shapes:returns_cache", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "model returned a Cache")
    assert "use_cache=False" in err and "tuples of tensors" in err
    assert list(tmp_path.iterdir()) == []


def test_exporter_errors_give_the_root_cause(tmp_path):
    """The real dynamo and TorchScript failures on a cache object, through ``exporter_reason``:
    the root cause and the hint, without torch's "step 1/3 ... Next steps" wrapper."""
    import ox_quant.export.exporter as export_module

    module, inputs = toy_shapes.returns_cache()
    for export in (
        lambda: export_module._export_dynamo(module, inputs, tmp_path / "a.onnx", ["input_ids"], ["a", "b"], [], 21, True, False),
        lambda: export_module._export_torchscript(module, inputs, tmp_path / "b.onnx", ["input_ids"], ["a", "b"], [], 21, False),
    ):
        with pytest.raises(Exception) as info:
            export()
        reason = exporter_reason(info.value)
        assert "Next steps" not in reason and "step 1/3" not in reason and "\n" not in reason
        assert "use_cache=False" in reason and len(reason) < 400


class _Unexportable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def test_failed_export_is_one_line_and_logged(tmp_path, capfd):
    """Both exporters fail: one line with both reasons; their output goes to --log, not the
    terminal (checked at the file-descriptor level), and no model is written."""
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]\n"
        "def build():\n"
        "    return M(), (torch.randn(2, 4, 4),)\n"
    )
    from ox_quant.cli import main

    log = tmp_path / "export.log"
    with pytest.raises(SystemExit) as info:
        main(["export", f"{source}:build", "-o", str(tmp_path / "m.onnx"), "--log", str(log)])
    out, err = capfd.readouterr()
    assert info.value.code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("ox-quant: error: export failed (dynamo exporter: ")
    assert "linalg_eigh" in err and "TorchScript exporter: UnsupportedOperatorError" in err
    assert f"exporter output in {log}" in err and "Next steps" not in err
    text = log.read_text()
    assert "Traceback" in text and "torch.onnx" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.log", "m.py"]
    with pytest.raises(ExportError) as failure:
        export_model(_Unexportable(), (torch.randn(2, 4, 4),), tmp_path / "n.onnx")
    assert "Traceback" in failure.value.log


def test_fallback_noise_stays_off_the_terminal(tmp_path, capfd):
    """dynamo fails on a data-dependent branch and TorchScript takes over: the summary names
    the reason in one line, while the graphs the exporters print stay out of the output."""
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum() > 0 else x - 1\n"
        "def build():\n"
        "    return M(), (torch.ones(1, 4),)\n"
    )
    from ox_quant.cli import main

    log = tmp_path / "export.log"
    with pytest.raises(SystemExit) as info:
        main(["export", f"{source}:build", "-o", str(tmp_path / "m.onnx"), "--log", str(log)])
    out, err = capfd.readouterr()
    assert info.value.code == 0, err
    assert err == "" and "def forward" not in out and "torchvision" not in out
    assert "fell back to TorchScript: GuardOnDataDependentSymNode" in out
    assert "def forward" in log.read_text()
    assert _dims(tmp_path / "m.onnx")["x"] == ["batch", 4]


def test_static_axis_cli(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "export", "toy-mlp", "-o", str(out), "--static-axis", "nope")
    assert_one_line_error(code, err, "--static-axis nope: expected INPUT:AXIS or a dynamic axis name (batch)")
    code, _, err = run_cli(capsys, "export", "toy-mlp", "-o", str(out), "--static-axis", "x:1")
    assert_one_line_error(code, err, "--static-axis x:1: not a dynamic axis (dynamic: x:0)")
    code, stdout, err = run_cli(capsys, "export", "toy-mlp", "-o", str(out), "--static-axis", "batch", "--torchscript")
    assert code == 0, err
    assert "dynamic axes: none" in stdout and "x[0] static: declared with --static-axis" in stdout
    assert _dims(out)["x"] == [4, 128]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((4, 128), np.float32)})[0].shape == (4, 64)


def test_json_reports_axes_and_reasons(tmp_path, capsys):
    from tests.verify_support import run_json

    code, payload = run_json(capsys, "export", "models.toy_shapes:audio_encoder", "-o", str(tmp_path / "a.onnx"), "--torchscript")
    assert code == 0
    axes = {(a["input"], a["axis"]): a for a in payload["axes"]}
    assert axes[("input_features", 2)]["name"] == "frames" and axes[("input_features", 1)]["name"] is None
    assert "mel bins" in axes[("input_features", 1)]["reason"]
    check = payload["shape_check"]
    assert check["sizes"] == {"batch": 3, "frames": 9} and check["example"] == {"batch": 1, "frames": 12}
    assert all(m["sqnr_db"] is None or m["sqnr_db"] > 80 for m in check["metrics"])
    assert "log" not in payload
    with pytest.raises(OxQuantError):  # the JSON mode fails the same way
        export_model(*toy_shapes.batch_one_fast_path(), tmp_path / "b.onnx")
