"""Embedded weights read in place and written streamed (ox_quant.ir.wire), held to protobuf.

Random small models (initializers, Constant nodes, If subgraphs, a model-local function,
typed-field and empty tensors, doc strings) are scanned and compared with the whole file
parsed by protobuf; converted through the in-place path and through whole protos, the
outputs must be the same bytes, and ONNX Runtime must run them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ox_quant.core.config import Block, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.ir import modelio, wire
from ox_quant.pipeline.convert import ConvertOptions, convert
from tests.helpers import run

K = 32


@st.composite
def model_specs(draw: st.DrawFn) -> dict[str, object]:
    return {
        "seed": draw(st.integers(0, 2**16)),
        "inits": draw(st.lists(st.sampled_from([8, 16, 32, 48]), max_size=3)),
        "constants": draw(st.lists(st.sampled_from([8, 32, 48]), max_size=2)),
        "typed": draw(st.booleans()),
        "empty": draw(st.booleans()),
        "subgraph": draw(st.booleans()),
        "function": draw(st.booleans()),
        "doc": draw(st.booleans()),
    }


def build(path: Path, spec: dict) -> dict[str, np.ndarray]:
    """Write the model ``spec`` describes (weights embedded); return feeds for it."""
    rng = np.random.default_rng(spec["seed"])

    def weight(n: int) -> np.ndarray:
        return (rng.standard_normal((K, n)) * 0.1).astype(np.float32)

    nodes, inits, outputs = [], [], []

    def output(name: str, n: int) -> None:
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n]))

    for i, n in enumerate(spec["inits"]):
        tensor = numpy_helper.from_array(weight(n), f"W{i}")
        if spec["doc"] and i == 0:
            tensor.doc_string = "first weight"
        inits.append(tensor)
        nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]))
        output(f"y{i}", n)
    for i, n in enumerate(spec["constants"]):
        nodes.append(helper.make_node("Constant", [], [f"c{i}"], value=numpy_helper.from_array(weight(n))))
        nodes.append(helper.make_node("MatMul", ["x", f"c{i}"], [f"yc{i}"]))
        output(f"yc{i}", n)
    if spec["typed"]:  # typed fields, not raw_data: float_data, double_data, int64_data
        inits.append(helper.make_tensor("T", TensorProto.FLOAT, [K, 48], weight(48).ravel().tolist(), raw=False))
        nodes.append(helper.make_node("MatMul", ["x", "T"], ["yt"]))
        output("yt", 48)
        typed = helper.make_tensor("tc_value", TensorProto.FLOAT, [K, 40], weight(40).ravel().tolist(), raw=False)
        nodes.append(helper.make_node("Constant", [], ["tc"], value=typed))
        nodes.append(helper.make_node("MatMul", ["x", "tc"], ["ytc"]))
        output("ytc", 40)
        doubles = weight(24).astype(np.float64)
        inits.append(helper.make_tensor("D", TensorProto.DOUBLE, [K, 24], doubles.ravel().tolist(), raw=False))
        nodes.append(helper.make_node("Cast", ["D"], ["d32"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("MatMul", ["x", "d32"], ["yd"]))
        output("yd", 24)
        inits.append(helper.make_tensor("I", TensorProto.INT64, [700], list(range(700)), raw=False))  # unused
    if spec["empty"]:
        inits.append(numpy_helper.from_array(np.zeros((1, 0), np.float32), "E"))
        nodes.append(helper.make_node("Concat", ["x", "E"], ["ye"], axis=1))
        output("ye", K)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])]
    feeds: dict[str, np.ndarray] = {"x": rng.standard_normal((1, K)).astype(np.float32)}
    if spec["subgraph"]:
        then = helper.make_graph(
            [helper.make_node("MatMul", ["x", "S"], ["s_out"])], "then", [],
            [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 40])],
            [numpy_helper.from_array(weight(40), "S")],
        )
        other = helper.make_graph(
            [helper.make_node("Constant", [], ["sc"], value=numpy_helper.from_array(weight(40), "sc_value")),
             helper.make_node("MatMul", ["x", "sc"], ["o_out"])], "else", [],
            [helper.make_tensor_value_info("o_out", TensorProto.FLOAT, [1, 40])],
        )
        nodes.append(helper.make_node("If", ["cond"], ["yif"], then_branch=then, else_branch=other))
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        feeds["cond"] = np.array(bool(rng.integers(0, 2)))
        output("yif", 40)
    functions = []
    if spec["function"]:
        body = [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(weight(36))),
                helper.make_node("MatMul", ["X", "fw"], ["Y"])]
        functions.append(helper.make_function("local", "Project", ["X"], ["Y"], body, [helper.make_opsetid("", 21)]))
        nodes.append(helper.make_node("Project", ["x"], ["yf"], domain="local"))
        output("yf", 36)
    if not outputs:
        nodes.append(helper.make_node("Identity", ["x"], ["yi"]))
        output("yi", K)
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 10
    onnx.save(model, str(path))
    return feeds


def restored(path: Path, scanned: wire.Scan) -> bytes:
    """The scanned model with every in-place tensor's bytes read back from the file."""
    proto = onnx.ModelProto()
    proto.ParseFromString(scanned.data)
    data = path.read_bytes()
    from ox_quant.ir.validate import tensors

    for tensor in tensors(proto):
        info = {e.key: e.value for e in tensor.external_data}
        if info.get("location") == path.name:
            offset, length = int(info["offset"]), int(info["length"])
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            field = scanned.typed.get(offset)
            if field == wire.FLOAT_DATA:
                tensor.float_data.extend(np.frombuffer(data, "<f4", length // 4, offset).tolist())
            elif field == wire.DOUBLE_DATA:
                tensor.double_data.extend(np.frombuffer(data, "<f8", length // 8, offset).tolist())
            else:
                tensor.raw_data = data[offset:offset + length]
    return proto.SerializeToString()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=model_specs(), min_bytes=st.sampled_from([1, 512, 4096]))
def test_scan_matches_protobuf(tmp_path, spec, min_bytes):
    path = tmp_path / "m.onnx"
    build(path, spec)
    scanned = wire.scan(path, min_bytes)
    reference, qualifying = wire.scan_reference(path, min_bytes)
    assert scanned.in_place == qualifying
    if scanned.in_place:
        assert restored(path, scanned) == reference
    else:
        assert scanned.data == b"" and not scanned.typed
    assert len(scanned.data) + scanned.in_place_bytes <= path.stat().st_size + 64 * max(scanned.in_place, 1)


def convert_both(src: Path, tmp_path: Path, monkeypatch, **options) -> tuple[bytes | str, bytes | str]:
    """Convert ``src`` in place and from whole protos: the two outputs (or error messages)."""
    results = []
    for in_place in (modelio.IN_PLACE_BYTES, None):
        monkeypatch.setattr(modelio, "IN_PLACE_BYTES", in_place)
        out = tmp_path / f"out_{in_place}.onnx"
        try:
            convert(src, out, ConvertOptions(**options))
            results.append(out.read_bytes())
        except OxQuantError as exc:
            results.append(str(exc))
    monkeypatch.undo()
    return results[0], results[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=model_specs())
def test_in_place_conversion_is_byte_identical_and_runs(tmp_path_factory, monkeypatch, spec):
    tmp_path = tmp_path_factory.mktemp("conv")
    src = tmp_path / "m.onnx"
    feeds = build(src, spec)
    before = digest(src)
    ours, whole = convert_both(src, tmp_path, monkeypatch, config=QuantConfig(bits=4, granularity=Block(16)))
    assert digest(src) == before  # the input is never modified
    assert ours == whole
    event("written" if isinstance(ours, bytes) else "refused (same message both ways)")
    if isinstance(ours, bytes):
        out = tmp_path / "out_4096.onnx"
        run(out, feeds)


def test_save_embedded_matches_ir_save(tmp_path, monkeypatch):
    """Unquantized tensors read in place, a folded Constant and a Transpose folded lazily: the
    streamed file is the bytes onnx_ir writes from whole protos."""
    spec = {"seed": 3, "inits": [48, 8, 32], "constants": [48], "typed": True, "empty": True,
            "subgraph": True, "function": True, "doc": True}
    src = tmp_path / "m.onnx"
    build(src, spec)
    assert sorted(set(wire.scan(src, 4096).typed.values())) == [wire.FLOAT_DATA, wire.DOUBLE_DATA]
    model = modelio.load_model(src)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert wire.save_embedded(model, tmp_path / "streamed.onnx", 4096) > 0
    monkeypatch.setattr(modelio, "IN_PLACE_BYTES", None)
    whole = modelio.load_model(src)
    ir.save(whole, tmp_path / "whole.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()


def test_symlinked_and_hard_linked_inputs_convert(tmp_path, monkeypatch):
    spec = {"seed": 4, "inits": [48, 32], "constants": [48], "typed": False, "empty": False,
            "subgraph": True, "function": False, "doc": False}
    store = tmp_path / "blobs"
    store.mkdir()
    feeds = build(store / "blob", spec)
    link = tmp_path / "model.onnx"
    link.symlink_to(store / "blob")
    ours, whole = convert_both(link, tmp_path, monkeypatch, config=QuantConfig(bits=4, granularity=Block(16)))
    assert isinstance(ours, bytes) and ours == whole
    hard = tmp_path / "hard.onnx"
    os.link(store / "blob", hard)
    assert modelio.read_proto(hard)[1] is None  # onnx_ir maps no file with two links: parsed whole
    report = convert(hard, tmp_path / "from_hard.onnx", ConvertOptions(config=QuantConfig(bits=4, granularity=Block(16))))
    assert (tmp_path / "from_hard.onnx").read_bytes() == ours and report.quantized
    run(tmp_path / "from_hard.onnx", feeds)


def test_external_output_of_embedded_input_refers_only_to_its_own_data(tmp_path, monkeypatch):
    """Over the size threshold the output gets external data; a Constant that stays a node
    (its output is a graph output) is written embedded, not as a reference to the input."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, 64)).astype(np.float32)
    kept = rng.standard_normal((K, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(kept))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [K, 64])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    monkeypatch.setattr("ox_quant.pipeline.convert.EXTERNAL_DATA_THRESHOLD", 0)
    report = convert(src, tmp_path / "out.onnx", ConvertOptions(config=QuantConfig(bits=4, granularity=Block(16))))
    assert report.external_data is not None
    out = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    from ox_quant.ir.validate import tensors

    locations = {e.value for t in tensors(out) for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    x = rng.standard_normal((1, K)).astype(np.float32)
    _, k = run(tmp_path / "out.onnx", {"x": x})
    np.testing.assert_array_equal(k, kept)


def test_truncated_embedded_model_is_refused_as_before(tmp_path):
    spec = {"seed": 5, "inits": [48, 48], "constants": [], "typed": False, "empty": False,
            "subgraph": False, "function": False, "doc": False}
    src = tmp_path / "m.onnx"
    build(src, spec)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 100])
    with pytest.raises(wire.WireError):
        wire.scan(src, 4096)
    with pytest.raises(OxQuantError, match="is not a readable ONNX model"):
        modelio.load_model(src)


# The memory bound: a child converting a ~192 MiB embedded model (four 48 MiB weights) peaks
# less than four weights above a child converting a tiny one. Measured: 151 MiB above, as
# with the same weights in external data; parsing whole protos put it 619 MiB above.
CHILD = """
import sys
import ox_quant.ir.modelio
from ox_quant.core.config import Block, QuantConfig
from ox_quant.pipeline.convert import ConvertOptions, convert
if sys.argv[3] == "whole":
    ox_quant.ir.modelio.IN_PLACE_BYTES = None
convert(sys.argv[1], sys.argv[2], ConvertOptions(config=QuantConfig(bits=4, granularity=Block(128))))
with open("/proc/self/status") as status:  # this process's own peak (getrusage counts the parent's at exec)
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def write_embedded_model(path: Path, count: int, k: int, n: int) -> None:
    """``count`` MatMul weights [k, n], embedded, written as protobuf fields by hand: each
    zero but for a seeded first row, the zeros left as holes in a sparse file."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out + bytes([value]))

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)],
    ).SerializeToString()
    nbytes = k * n * 4
    heads = []
    for i in range(count):
        header = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[k, n]).SerializeToString()
        tensor = header + b"\x4a" + varint(nbytes)  # field 9 (raw_data), wire type 2
        heads.append(b"\x2a" + varint(len(tensor) + nbytes) + tensor)  # GraphProto.initializer = 5
    graph_len = len(graph) + sum(len(h) for h in heads) + count * nbytes
    model = onnx.ModelProto(ir_version=10, opset_import=[helper.make_opsetid("", 21)]).SerializeToString()
    with open(path, "wb") as f:
        f.write(model + b"\x3a" + varint(graph_len) + graph)  # ModelProto.graph = 7
        for head in heads:
            f.write(head)
            start = f.tell()
            f.write(rng.standard_normal(n).astype(np.float32).tobytes())
            f.seek(start + nbytes)
        f.truncate(f.tell())


def child_peak(src: Path, out: Path, whole: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [sys.executable, "-c", CHILD, str(src), str(out), "whole" if whole else "in-place"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident set from /proc (Linux)")
def test_embedded_model_converts_in_memory_near_one_weight(tmp_path):
    count, k, n = 4, 4096, 3072  # four 48 MiB weights: 192 MiB
    big, small = tmp_path / "big.onnx", tmp_path / "small.onnx"
    write_embedded_model(big, count, k, n)
    write_embedded_model(small, count, 256, 128)
    model_bytes = big.stat().st_size
    assert model_bytes > 190 * 2**20
    baseline = child_peak(small, tmp_path / "small_out.onnx")
    peak = child_peak(big, tmp_path / "big_out.onnx")
    weight = k * n * 4
    assert peak - baseline < 4 * weight, (
        f"peak {peak / 2**20:.0f} MiB vs {baseline / 2**20:.0f} MiB for a tiny model: "
        f"{(peak - baseline) / 2**20:.0f} MiB more, bound 4 weights = {4 * weight / 2**20:.0f} MiB "
        f"(model {model_bytes / 2**20:.0f} MiB)"
    )
    run(tmp_path / "big_out.onnx", {"x": np.ones((1, k), np.float32)})
    # The bound tells the two apart: whole protos (the reference path) exceed it.
    assert child_peak(big, tmp_path / "whole_out.onnx", whole=True) - baseline > 4 * weight
    assert (tmp_path / "whole_out.onnx").read_bytes() == (tmp_path / "big_out.onnx").read_bytes()
