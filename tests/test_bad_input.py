"""Bad input, each case on its own: exit 1, one clear line on stderr, no traceback, no
output file or temporary folder left behind, and the input bytes unchanged."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ox_quant.cli import main
from ox_quant.errors import OxQuantError
from ox_quant.runtime.session import make_session
from tests.helpers import matmul_model, random_weights
from tests.helpers import run_cli as cli

REPO = Path(__file__).resolve().parents[1]




def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (recursively) with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def assert_rejected(capsys, folder: Path, args: list[str], message: str) -> str:
    """``ox-quant args`` exits 1 with one line containing ``message``; ``folder`` is unchanged."""
    before = snapshot(folder)
    code, out, err = cli(capsys, *args)
    assert code == 1, (code, err)
    assert err.count("\n") == 1 and err.startswith("ox-quant: error: "), err
    assert message in err, err
    assert "Traceback" not in err and "internal error" not in err
    assert snapshot(folder) == before  # input unchanged, no output, no .ox-quant-* folder
    return err


@pytest.fixture()
def model(tmp_path) -> Path:
    return matmul_model(tmp_path / "model.onnx", random_weights(np.random.default_rng(5), 64, 32, 16))


@pytest.fixture()
def external(tmp_path) -> Path:
    return matmul_model(tmp_path / "ext.onnx", random_weights(np.random.default_rng(6), 64, 32), external=True)


def edit(path: Path, change, target: Path | None = None) -> Path:  # type: ignore[no-untyped-def]
    """Save ``change(proto)`` of the model at ``path`` (external data not loaded) to ``target``."""
    proto = onnx.load(str(path), load_external_data=False)
    change(proto)
    target = target or path
    target.write_bytes(proto.SerializeToString())
    return target


# ----------------------------------------------------------------------------------
# Not a model


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a protobuf at all \xff\xfe" * 10, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4],
    ids=["empty", "text", "binary"],
)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_not_an_onnx_file(tmp_path, capsys, content, command):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    message = "it has no graph" if not content else "not a readable ONNX model"
    assert_rejected(capsys, tmp_path, [command, str(path)], message)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.75, 0.999])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_truncated_protobuf(model, tmp_path, capsys, fraction, command):
    data = model.read_bytes()
    model.write_bytes(data[: int(len(data) * fraction)])
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, command, str(model), *(["-o", str(tmp_path / "q.onnx")] if command == "convert" else []))
    assert code == 1 and err.count("\n") == 1, err
    # depending on where the cut falls, the parser fails or the pieces left are inconsistent
    assert any(m in err for m in ("not a readable ONNX model", "is not a valid ONNX model", "holds", "no graph")), err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------
# External data


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_missing_external_data(external, tmp_path, capsys, command):
    external.with_name("ext.onnx.data").unlink()
    assert_rejected(capsys, tmp_path, [command, str(external)], "external data file ext.onnx.data of tensor 'W0' is missing")


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_short_external_data(external, tmp_path, capsys, command):
    data = external.with_name("ext.onnx.data")
    data.write_bytes(data.read_bytes()[:-5])
    assert_rejected(capsys, tmp_path, [command, str(external)], "external data file ext.onnx.data is too short for tensor")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("length", "12", "declares 12 bytes of external data, but its shape [64, 32] and dtype FLOAT need 8192"),
        ("offset", "-4", "negative external-data offset"),
        ("offset", "x", "non-numeric external-data offset"),
        ("location", "../ext.onnx.data", "outside the model's folder"),
        ("location", "/etc/hostname", "outside the model's folder"),
        ("offsEt", "0", "unknown external-data key 'offsEt'"),
    ],
)
def test_bad_external_data_entries(external, tmp_path, capsys, key, value, message):
    def change(proto: onnx.ModelProto) -> None:
        entries = proto.graph.initializer[0].external_data
        for entry in entries:
            if entry.key == key:
                entry.value = value
                return
        entries.add(key=key, value=value)

    edit(external, change)
    assert_rejected(capsys, tmp_path, ["convert", str(external)], message)


# ----------------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize(
    "ir_version, message",
    [(onnx.IR_VERSION + 1, "newer than the installed onnx"), (2, "ox-quant reads IR 3 and newer")],
)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_unreadable_ir_versions(model, tmp_path, capsys, ir_version, message, command):
    edit(model, lambda p: setattr(p, "ir_version", ir_version))
    assert_rejected(capsys, tmp_path, [command, str(model)], f"has IR version {ir_version}")
    assert_rejected(capsys, tmp_path, [command, str(model)], message)


def test_ir_version_newer_than_onnxruntime_converts_to_one_it_loads(model, tmp_path, capsys):
    """onnx 1.23 writes IR 14, which ONNX Runtime 1.31 refuses (1.32 loads it): the output is
    stamped with the newest IR version the installed ONNX Runtime loads."""
    from ox_quant.runtime.session import max_ir_version

    edit(model, lambda p: setattr(p, "ir_version", onnx.IR_VERSION))
    out = tmp_path / "q.onnx"
    code, _, err = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "16")
    assert code == 0, err
    assert onnx.load(str(out)).ir_version == min(onnx.IR_VERSION, max_ir_version())
    make_session(out)


def _set_opset(version: int):  # type: ignore[no-untyped-def]
    def change(proto: onnx.ModelProto) -> None:
        proto.opset_import[0].version = version

    return change


def test_opset_newer_than_onnx_knows(model, tmp_path, capsys):
    newest = onnx.defs.onnx_opset_version()
    edit(model, _set_opset(newest + 1))
    for command in ("convert", "inspect"):
        assert_rejected(capsys, tmp_path, [command, str(model)], f"ai.onnx opset {newest + 1}, newer than the installed onnx")


def test_opset_newer_than_onnxruntime_runs(model, tmp_path, capsys):
    from ox_quant.runtime.session import onnxruntime_supports_opset

    newest = onnx.defs.onnx_opset_version()
    unsupported = next((v for v in range(27, newest + 1) if not onnxruntime_supports_opset(v)), None)
    if unsupported is None:
        pytest.skip(f"the installed onnxruntime runs every opset this onnx knows (up to {newest})")
    edit(model, _set_opset(unsupported))
    assert_rejected(capsys, tmp_path, ["convert", str(model)], "which the installed onnxruntime")
    code, _, err = cli(capsys, "inspect", str(model))  # reading it needs no ONNX Runtime
    assert code == 0, err


@pytest.mark.parametrize("opset", [1, 6])
def test_opset_older_than_7_is_refused_by_convert_but_inspected(model, tmp_path, capsys, opset):
    edit(model, _set_opset(opset))
    assert_rejected(capsys, tmp_path, ["convert", str(model)], f"uses ai.onnx opset {opset}; ox-quant converts opset 7 and newer")
    code, _, err = cli(capsys, "inspect", str(model))
    assert code == 0, err


def test_opset_7_is_upgraded_for_qdq_and_loads(tmp_path, capsys):
    src = matmul_model(tmp_path / "old.onnx", random_weights(np.random.default_rng(7), 64, 32), opset=7, ir_version=7)
    out = tmp_path / "q.onnx"
    code, _, err = cli(capsys, "convert", str(src), "-o", str(out), "--block-size", "-1", "--bits", "8")
    assert code == 0, err
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain == "") >= 21
    make_session(out)


def test_missing_or_duplicate_opset_import(model, tmp_path, capsys):
    edit(model, lambda p: p.opset_import.append(helper.make_opsetid("", 21)))
    assert_rejected(capsys, tmp_path, ["inspect", str(model)], "imports the ai.onnx opset 2 times")
    edit(model, lambda p: p.ClearField("opset_import"))
    assert_rejected(capsys, tmp_path, ["convert", str(model)], "does not import the ai.onnx opset")


# ----------------------------------------------------------------------------------
# Weights


def _with_value(path: Path, name: str, index: tuple[int, int], value: float) -> None:
    def change(proto: onnx.ModelProto) -> None:
        for i, tensor in enumerate(proto.graph.initializer):
            if tensor.name == name:
                array = numpy_helper.to_array(tensor).copy()
                array[index] = value
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))

    edit(path, change)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_is_named(model, tmp_path, capsys, value):
    _with_value(model, "W1", (3, 5), value)
    out = tmp_path / "q.onnx"
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(out), "--block-size", "16"],
                    "weight 'W1' contains 1 NaN/Inf value (first at [3, 5])")
    # excluding the tensor gets the rest converted; the NaN passes through untouched
    code, _, err = cli(capsys, "convert", str(model), "-o", str(out), "--block-size", "16", "--exclude", "W1")
    assert code == 0, err


def test_nonfinite_gemm_weight_position_is_as_stored(tmp_path, capsys):
    """Gemm(transB=1) stores W as [N, K]; the message indexes the tensor as stored."""
    w = np.random.default_rng(10).standard_normal((16, 64)).astype(np.float32)
    w[7, 40] = np.inf
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])], [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    path = tmp_path / "gemm.onnx"
    onnx.save(proto, str(path))
    assert_rejected(capsys, tmp_path, ["convert", str(path), "-o", str(tmp_path / "q.onnx"), "--block-size", "32",
                                       "--gemm-bits", "bits"],
                    "weight 'W' contains 1 NaN/Inf value (first at [7, 40])")


def test_nonfinite_weight_in_external_data(tmp_path, capsys):
    weights = random_weights(np.random.default_rng(8), 64, 32)
    weights["W0"][10, 2] = np.nan
    src = matmul_model(tmp_path / "ext.onnx", weights, external=True)
    assert_rejected(capsys, tmp_path, ["convert", str(src), "-o", str(tmp_path / "q.onnx"), "--block-size", "32"],
                    "weight 'W0' contains 1 NaN/Inf value (first at [10, 2])")


def test_range_too_wide_for_float32_scales(model, tmp_path, capsys):
    _with_value(model, "W0", (0, 1), 3e38)
    _with_value(model, "W0", (1, 1), -3e38)
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(tmp_path / "q.onnx"), "--block-size", "32", "--asymmetric"],
                    "weight 'W0' spans a range too wide for float32 scales")


def test_tensor_bytes_disagree_with_shape(model, tmp_path, capsys):
    def change(proto: onnx.ModelProto) -> None:
        proto.graph.initializer[1].dims[0] = 33

    edit(model, change)
    for command in ("convert", "inspect"):
        assert_rejected(capsys, tmp_path, [command, str(model)], "tensor 'W1' holds 2048 bytes, but its shape [33, 16] and dtype FLOAT need 2112")


def test_invalid_graph_is_refused_with_the_checkers_reason(model, tmp_path, capsys):
    def change(proto: onnx.ModelProto) -> None:
        proto.graph.node[1].input[0] = "nowhere"

    edit(model, change)
    err = assert_rejected(capsys, tmp_path, ["convert", str(model)], "model.onnx is not a valid ONNX model:")
    assert "nowhere" in err


def test_contrib_op_that_onnxruntime_rejects(tmp_path, capsys):
    """onnx's checker knows nothing of com.microsoft ops; ONNX Runtime's graph check does."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])
    b = numpy_helper.from_array(np.zeros((16, 2, 8), np.uint8), "B")
    s = numpy_helper.from_array(np.ones(32, np.float32), "S")
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", name="mnb",
                            K=32, N=16, bits=4, block_size=16, colour=3)
    graph = helper.make_graph([node], "g", [x], [y], [b, s])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 10
    path = tmp_path / "contrib.onnx"
    onnx.save(proto, str(path))
    assert_rejected(capsys, tmp_path, ["convert", str(path)], "rejects contrib.onnx")
    # inconsistent attributes are caught by ox-quant itself, for inspect too
    node = proto.graph.node[0]
    node.attribute.pop()
    for attr in node.attribute:
        if attr.name == "N":
            attr.i = 5
    onnx.save(proto, str(path))
    for command in ("convert", "inspect"):
        assert_rejected(capsys, tmp_path, [command, str(path)], "MatMulNBits node 'mnb': input 'B' has shape [16, 2, 8]")


# ----------------------------------------------------------------------------------
# Output paths


def test_output_is_the_input_or_its_data(model, external, tmp_path, capsys):
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(model)], "output path is the input model")
    link = tmp_path / "link.onnx"
    os.link(model, link)  # a hard link is the same file under another name
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(link)], "output path is the input model")
    link.unlink()
    os.symlink(model, link)
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(link)], "output path is the input model")
    link.unlink()
    data = external.with_name("ext.onnx.data")
    assert_rejected(capsys, tmp_path, ["convert", str(external), "-o", str(data)], "would overwrite the input's external data file")
    # output "ext" writes its data to "ext.data": fine; output named so its data file is the data
    assert_rejected(capsys, tmp_path, ["convert", str(external), "-o", str(tmp_path / "ext.onnx")], "output path is the input model")
    renamed = tmp_path / "m.data"
    os.replace(model, renamed)
    assert_rejected(capsys, tmp_path, ["convert", str(renamed), "-o", str(tmp_path / "m")], "external data file m.data would overwrite the input model")


def test_output_parent_is_a_file(model, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(blocker / "q.onnx")], "is not a directory")


def test_output_is_a_directory_is_a_usage_error(model, tmp_path, capsys):
    (tmp_path / "q.onnx").mkdir()
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "q.onnx"))
    assert code == 2 and "is a directory" in err  # click's own check of -o
    assert snapshot(tmp_path) == before


def test_output_name_too_long(model, tmp_path, capsys):
    out = tmp_path / ("q" * 300 + ".onnx")
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(out)], "File name too long")


def test_file_size_limit_fails_mid_write_and_leaves_nothing(model, tmp_path):
    """RLIMIT_FSIZE binds root too: writing stops with EFBIG halfway through the output."""
    resource = pytest.importorskip("resource")
    big = matmul_model(tmp_path / "big.onnx", random_weights(np.random.default_rng(9), 256, 256))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(tmp_path)
    limit = 20_000  # the output is ~40 KB; python's own imports write nothing this big

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ox_quant.cli", "convert", str(big), "-o", str(out_dir / "q.onnx"), "--block-size", "32"],
        capture_output=True, text=True, cwd=REPO, env=env, preexec_fn=cap, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ox-quant: error: cannot write") and result.stderr.count("\n") == 1, result.stderr
    assert "File too large" in result.stderr
    assert snapshot(tmp_path) == before  # nothing in out/, no temporary folder


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_directory(model, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(locked / "q.onnx")], "is not writable")
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "9"], "bits must be between 2 and 8"),
        (["--bits", "1"], "bits must be between 2 and 8"),
        (["--bits", "-4"], "bits must be between 2 and 8"),
        (["--block-size", "48", "--format", "matmulnbits"], "power of two"),
        (["--block-size", "4096"], "larger than K"),
        (["--block-size", "0"], "block size must be a positive integer"),
        (["--block-size", "-2"], "block size must be a positive integer"),
        (["--granularity", "channel-group:64"], "larger than N"),
        (["--accuracy-level", "-1"], "accuracy level must be 0-4"),
    ],
)
def test_impossible_flags(model, tmp_path, capsys, args, message):
    assert_rejected(capsys, tmp_path, ["convert", str(model), "-o", str(tmp_path / "q.onnx"), *args], message)


# ----------------------------------------------------------------------------------
# The CLI's two error paths


def test_debug_shows_the_traceback(model, tmp_path):
    with pytest.raises(OxQuantError, match="output path is the input model"):
        main(["--debug", "convert", str(model), "-o", str(model)])


def test_unexpected_exception_is_one_line_internal_error(model, tmp_path, capsys, monkeypatch):
    import ox_quant.pipeline.convert

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug\nspanning lines")

    monkeypatch.setattr(ox_quant.pipeline.convert, "find_sites", broken)
    code, _, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "q.onnx"))
    assert code == 1
    assert err == "ox-quant: internal error: RuntimeError: a bug (rerun with --debug for the traceback)\n"
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(RuntimeError):
        main(["--debug", "convert", str(model), "-o", str(tmp_path / "q.onnx")])
