"""``ox-quant export`` on the command line, and the SPEC error paths."""

from __future__ import annotations

import onnx

from tests.verify_support import assert_one_line_error, run_cli, run_json


def test_export_cli_json(tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    code, payload = run_json(capsys, "export", "toy-mlp", "-o", str(out), "--dynamic-axis", "x:0=n")
    assert code == 0
    assert payload["output"] == str(out) and payload["exporter"] == "dynamo"
    assert payload["check_passed"] is True and payload["check"][0]["sqnr_db"] > 80
    assert payload["dynamic_axes"] == [{"input": "x", "axis": 0, "name": "n"}]
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "n"


def test_export_cli_human(tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", "ox_quant_models.toy:mlp", "-o", str(tmp_path / "m.onnx"))
    assert code == 0, err
    assert "dynamo exporter" in out and "SQNR dB" in out


def test_export_cli_mismatch_exits_1(tmp_path, capsys):
    source = tmp_path / "noisy.py"
    source.write_text(
        "import torch\n"
        "class Noisy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x + torch.rand_like(x)\n"
        "def build():\n"
        "    return Noisy(), (torch.zeros(2, 8),)\n"
    )
    code, out, err = run_cli(capsys, "export", f"{source}:build", "-o", str(tmp_path / "n.onnx"))
    assert_one_line_error(code, err, "does not match PyTorch")
    assert (tmp_path / "n.onnx").is_file()


def test_export_error_paths(tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    cases = [
        (["export", "no-such-model", "-o", out], "unknown model 'no-such-model'"),
        (["export", str(tmp_path / "missing.py") + ":f", "-o", out], "model spec file not found"),
        (["export", "ox_quant_models.toy:nothing_here", "-o", out], "'nothing_here' is not a callable"),
        (["export", "no_such_pkg.mod:f", "-o", out], "cannot import module 'no_such_pkg.mod'"),
        (["export", "toy-mlp", "-o", str(tmp_path / "x.txt")], "must end with .onnx"),
        (["export", "toy-mlp", "-o", str(tmp_path / "nodir" / "x.onnx")], "does not exist"),
        (["export", "toy-mlp", "-o", out, "--dynamic-axis", "bad"], "INPUT:AXIS=NAME"),
        (["export", "toy-mlp", "-o", out, "--dynamic-axis", "y:0=b"], "unknown input 'y'"),
        (["export", "toy-mlp", "-o", out, "--dynamic-axis", "x:5=b"], "out of range"),
        (["export", "toy-mlp", "-o", out, "--static", "--dynamic-axis", "x:0=b"], "exclude each other"),
    ]
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return 3\n")
    cases.append((["export", f"{bad}:f", "-o", out], "must return (module, example_inputs)"))
    for args, fragment in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]
