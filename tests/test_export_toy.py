"""Exporting the toy models: the float ONNX matches PyTorch, on ORT, across shapes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ox_quant.errors import OxQuantError
from ox_quant.export.exporter import DynamicAxis, export_model, export_spec, parse_dynamic_axis
from ox_quant.runtime.session import max_ir_version
from ox_quant.verification.verify import verify
from tests.verify_support import TOY_MODELS, exported  # noqa: F401 (fixture)


@pytest.mark.parametrize("name", TOY_MODELS)
def test_export_matches_pytorch(exported, name):  # noqa: F811
    path, report = exported[name]
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.ir_version <= max_ir_version() and report.opset == 21
    assert report.check and report.check_passed
    assert all(m.sqnr_db > 80 for m in report.check)
    # every nn.Linear weight stays an initializer the quantizer can find
    assert report.matmul_weights == {"toy-mlp": 3, "toy-transformer": 7, "toy-cnn": 2}[name]
    cross = verify(name, path, min_sqnr_db=80.0)
    assert cross.reference_kind == "pytorch" and cross.passed, cross.failures
    assert cross.outputs[0].sqnr_db > 80 and cross.outputs[0].cosine > 0.999999


def test_dynamic_axes_work_at_other_sizes(exported):  # noqa: F811
    path, report = exported["toy-transformer"]
    assert {(a.input, a.axis, a.name) for a in report.dynamic_axes} == {
        ("input_ids", 0, "batch"),
        ("input_ids", 1, "sequence"),
    }
    result = verify("toy-transformer", path, dims={"batch": 3, "sequence": 7}, min_sqnr_db=80.0)
    assert result.inputs[0].shape == (3, 7) and result.passed
    assert result.outputs[0].shape == (3, 7, 256)


def test_named_and_static_axes(tmp_path):
    static = export_spec("toy-mlp", tmp_path / "static.onnx", dynamic_axes=[])
    assert static.dynamic_axes == () and static.inputs[0].shape == (4, 128)
    named = export_spec("toy-mlp", tmp_path / "named.onnx", dynamic_axes=[parse_dynamic_axis("x:0=rows")])
    assert [(a.input, a.axis, a.name) for a in named.dynamic_axes] == [("x", 0, "rows")]


def test_torchscript_fallback_is_reported(tmp_path, monkeypatch):
    import ox_quant.export.exporter as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure\nsecond line")

    monkeypatch.setattr(export_module, "_export_dynamo", broken)
    report = export_spec("toy-cnn", tmp_path / "ts.onnx")
    assert report.exporter == "torchscript"
    assert report.fallback_reason == "RuntimeError: simulated dynamo failure"
    assert report.check_passed and report.ir_version <= max_ir_version()
    assert report.opset <= 21  # the TorchScript exporter caps it at its own maximum
    assert verify("toy-cnn", tmp_path / "ts.onnx", min_sqnr_db=80.0).passed


def test_external_data(tmp_path):
    report = export_spec("toy-mlp", tmp_path / "ext.onnx", external_data=True)
    assert report.external_data and (tmp_path / "ext.onnx.data").is_file()
    assert (tmp_path / "ext.onnx").stat().st_size < 10_000  # weights are not inline
    assert report.check_passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    import ox_quant.export.exporter as export_module

    def failing_check(*args, **kwargs):
        raise OxQuantError("simulated failure after writing")

    monkeypatch.setattr(export_module, "_check", failing_check)
    with pytest.raises(OxQuantError):
        export_spec("toy-mlp", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


class _Noisy(torch.nn.Module):
    """Adds fresh noise on every call: ORT and PyTorch cannot agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_mismatch_is_reported_not_hidden(tmp_path):
    report = export_model(_Noisy(), (torch.zeros(2, 64),), tmp_path / "noisy.onnx")
    assert not report.check_passed
    assert report.check[0].sqnr_db < 60
    assert (tmp_path / "noisy.onnx").is_file()  # kept, and the CLI exits 1 (test_export_cli)


def test_spec_forms_and_inputs_untouched(tmp_path):
    source = tmp_path / "my_model.py"
    source.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Linear(64, 32).eval(), torch.randn(3, 64)\n"
    )
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    report = export_spec(f"{source}:build", tmp_path / "lin.onnx")
    assert report.check_passed and report.inputs[0].shape == ("batch", 64)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    module_report = export_spec("ox_quant_models.toy:cnn", tmp_path / "cnn.onnx", check=False)
    assert module_report.check == () and module_report.check_passed


def test_bad_dynamic_axis_text():
    with pytest.raises(OxQuantError, match="INPUT:AXIS=NAME"):
        parse_dynamic_axis("x0batch")
    assert parse_dynamic_axis("input_ids:1=seq") == DynamicAxis("input_ids", 1, "seq")
