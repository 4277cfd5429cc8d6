"""The CLI contract of DESIGN.md: convert and inspect, JSON, exit codes, file safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import digest, matmul_model, random_weights, relative_error, run
from tests.helpers import run_cli as cli


@pytest.fixture()
def model(tmp_path):
    rng = np.random.default_rng(3)
    return matmul_model(tmp_path / "model.onnx", random_weights(rng, 256, 128, 64))


def test_headline_command_writes_block128_int4_beside_input(model, capsys):
    code, out, err = cli(capsys, "convert", str(model), "--block-size", "128")
    assert code == 0, err
    output = model.with_name("model.int4-block128.onnx")
    assert output.is_file()
    assert "2 weights quantized" in out and str(output) in out
    code, out, _ = cli(capsys, "inspect", str(output), "--json")
    info = json.loads(out)
    assert [(q["bits"], q["granularity"], q["block_size"], q["format"]) for q in info["quantized"]] == [
        (4, "block", 128, "matmulnbits")
    ] * 2
    x = np.random.default_rng(0).standard_normal((1, 3, 256)).astype(np.float32)
    (y,) = run(output, {"x": x})
    assert np.isfinite(y).all()


def test_json_contract(model, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    code, out, _ = cli(capsys, "convert", str(model), "-o", str(out_path), "--block-size", "-1", "--bits", "8",
                       "--symmetric", "--exclude", "W1", "--json")
    assert code == 0
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["output"] == str(out_path)
    assert report["quantized"] == [
        {
            "name": "W0", "op": "MatMul", "shape": [256, 128], "stored_shape": [256, 128], "bits": 8,
            "granularity": "channel",
            "block_size": -1, "symmetric": True, "format": "qdq",
            "format_reason": report["quantized"][0]["format_reason"], "config_reason": "--bits",
            "stored_bytes": 256 * 128 + 128 * 4, "bits_per_weight": pytest.approx((256 * 128 + 512) * 8 / (256 * 128)),
            "algorithm": "rtn", "calibration": None,
        }
    ]
    assert report["skipped"] == [{"name": "W1", "reason": "excluded by --exclude 'W1'"}]
    assert report["bits_per_weight"] == pytest.approx(8 + 128 * 32 / (256 * 128), rel=1e-4)
    assert report["input_bytes"] == model.stat().st_size
    assert report["output_bytes"] == out_path.stat().st_size
    assert report["policy"].startswith("MatMul at int8 channel sym; Gemm float (--gemm-bits); Conv float (--conv-bits)")
    assert report["calibration"] is None


@pytest.mark.parametrize(
    "flags",
    [
        ["--block-size", "64"],
        ["--granularity", "channel-group:32", "--asymmetric"],
        ["--bits", "8", "--granularity", "tensor", "--format", "qdq"],
        ["--bits", "2", "--block-size", "32", "--accuracy-level", "4"],
    ],
)
def test_identical_input_and_flags_give_identical_bytes_and_input_untouched(model, tmp_path, capsys, flags):
    before = digest(model)
    a, b = tmp_path / "a.onnx", tmp_path / "b" / "a.onnx"
    b.parent.mkdir()
    assert cli(capsys, "convert", str(model), "-o", str(a), *flags)[0] == 0
    assert cli(capsys, "convert", str(model), "-o", str(b), *flags)[0] == 0
    assert digest(a) == digest(b)
    assert digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b", "model.onnx"]


def test_external_data_input_and_output(tmp_path, capsys):
    rng = np.random.default_rng(4)
    weights = random_weights(rng, 128, 64)
    src = matmul_model(tmp_path / "ext.onnx", weights, external=True)
    data_before = digest(tmp_path / "ext.onnx.data")
    out = tmp_path / "q" / "ext_q.onnx"
    out.parent.mkdir()
    code, stdout, err = cli(capsys, "convert", str(src), "-o", str(out), "--block-size", "32", "--symmetric", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["external_data"] == str(out.with_name("ext_q.onnx.data"))
    assert out.with_name("ext_q.onnx.data").is_file()
    assert report["output_bytes"] == out.stat().st_size + out.with_name("ext_q.onnx.data").stat().st_size
    assert digest(tmp_path / "ext.onnx.data") == data_before
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    from ox_quant.core.config import Block, QuantConfig
    from ox_quant.core.quantize import quantize

    (y,) = run(out, {"x": x})
    ref = x.astype(np.float64) @ quantize(weights["W0"], QuantConfig(symmetric=True, granularity=Block(32))).dequantize()
    assert relative_error(y, ref) <= 1e-5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "9"], "bits must be between 2 and 8"),
        (["--bits", "3", "--format", "qdq"], "--format qdq cannot express int3"),
        (["--bits", "3", "--format", "matmulnbits"], "MatMulNBits takes 2/4/8 bits, not 3"),
        (["--block-size", "100", "--format", "matmulnbits"], "power of two"),
        (["--block-size", "4096"], "larger than K"),
        (["--granularity", "rows"], "unknown granularity"),
        (["--granularity", "tensor", "--block-size", "32"], "--block-size applies to block"),
        (["--exclude", "("], "not a valid regular expression"),
        (["--accuracy-level", "7"], "accuracy level must be 0-4"),
    ],
)
def test_bad_flags_exit_1_with_one_line(model, tmp_path, capsys, args, message):
    before = digest(model)
    code, out, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "x.onnx"), *args)
    assert code == 1
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    assert digest(model) == before


def test_bad_inputs_exit_1(model, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \xff\xfe" * 10)
    for args, message in [
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([str(junk)], "not a readable ONNX model"),
        ([str(model), "-o", str(model)], "output path is the input model"),
        ([str(model), "-o", str(tmp_path / "nodir" / "x.onnx")], "does not exist"),
    ]:
        code, _, err = cli(capsys, "convert", *args)
        assert code == 1, args
        assert message in err and err.count("\n") == 1, err


def test_usage_errors_exit_2(model, capsys):
    code, _, err = cli(capsys, "convert", str(model), "--format", "bogus")
    assert code == 2
    code, _, _ = cli(capsys, "convert")
    assert code == 2


def test_console_script_runs(model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ox_quant.cli", "convert", str(model), "-o", str(tmp_path / "s.onnx"), "--json"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "s.onnx")
    result = subprocess.run([sys.executable, "-m", "ox_quant.cli", "convert", "--help"], capture_output=True, text=True)
    assert "--block-size" in result.stdout and "--granularity" in result.stdout


def test_demo_runs_the_whole_job_on_the_builtin_model(tmp_path, capsys):
    code, out, err = cli(capsys, "demo", "--out", str(tmp_path / "demo"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["quantized"] == 14 and result["config"] == "int4 block:128 asym"  # the CLI default
    assert result["output_bytes"] < result["input_bytes"] / 6
    assert 0.8 < result["cosine"] < 1.0 and result["sqnr_db"] > 3
    assert Path(result["output"]).is_file()


@pytest.mark.parametrize("granularity, expected", [
    ("tensor", ("tensor", None)), ("channel", ("channel", -1)), ("channel-group:16", ("channel-group", 16)),
    ("block:32", ("block", 32)),
])
def test_inspect_reads_custom_op_models(model, tmp_path, capsys, granularity, expected):
    out = tmp_path / "c.onnx"
    code, stdout, err = cli(capsys, "convert", str(model), "-o", str(out), "--bits", "3", "--granularity", granularity, "--json")
    assert code == 0, err
    converted = json.loads(stdout)
    code, stdout, _ = cli(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert [(q["format"], q["bits"], q["granularity"], q["block_size"]) for q in info["quantized"]] == [
        ("custom", 3, *expected)] * 2
    assert info["bits_per_weight"] == pytest.approx(converted["bits_per_weight"])
