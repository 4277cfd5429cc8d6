"""Fuzzing ``convert`` and ``inspect`` with a few hundred mutated small models.

Every case must end in exit 0 or in exit 1 with one line on stderr that comes from
ox-quant's own validation (``ox-quant: error: ...``), never a traceback, never the
last-resort "internal error" handler, never a hang. A model written with exit 0 must
load in ONNX Runtime. The input bytes never change and no partial output or temporary
folder is left behind. Seeds are fixed, so a failing case id reproduces exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ox_quant.cli import main
from ox_quant.pipeline.load import load_model
from ox_quant.runtime.custom_ops import library_available
from ox_quant.runtime.session import make_session
from tests.helpers import digest, matmul_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 20240611
CASE_BUDGET_S = 20  # per in-process case; tiny models take well under a second
FLAG_SETS: list[list[str]] = [
    [],
    ["--block-size", "16"],
    ["--block-size", "-1", "--bits", "8"],
    ["--granularity", "tensor", "--format", "qdq"],
    ["--bits", "2", "--block-size", "16", "--asymmetric"],
    ["--granularity", "channel-group:4", "--asymmetric"],
    ["--block-size", "32", "--format", "qdq", "--asymmetric"],
    ["--bits", "3", "--block-size", "16"],  # ox-quant's custom op
]
ODD_INTS = [-(2**63), -(2**31), -7, -1, 0, 1, 2, 3, 5, 17, 99, 2**31, 2**40]
ODD_DTYPES = [0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 21, 22, 23, 24, 25, 26, 99]


# ----------------------------------------------------------------------------------
# Base models


def mixed_model(path: Path) -> Path:
    """Gemm(transB) + bias, Relu, a shared MatMul weight, a weight also used by Add,
    Transpose, Gather (embedding) and Conv: every op the converter may learn about."""
    rng = np.random.default_rng(1)
    f = np.float32

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(f), name)

    nodes = [
        helper.make_node("Gemm", ["x", "Wg", "bg"], ["h0"], name="gemm", transB=1),
        helper.make_node("Relu", ["h0"], ["h1"], name="relu"),
        helper.make_node("MatMul", ["h1", "Ws"], ["h2"], name="mm_shared_a"),
        helper.make_node("MatMul", ["h2", "Ws"], ["h3"], name="mm_shared_b"),
        helper.make_node("MatMul", ["h3", "Wm"], ["h4"], name="mm_also_add"),
        helper.make_node("Add", ["h4", "Wm"], ["h5"], name="add"),
        helper.make_node("Transpose", ["h5"], ["h6"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h6", "Wo"], ["y"], name="mm_out"),
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="gather", axis=0),
        helper.make_node("Conv", ["img", "Wc"], ["feat"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 32]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 2, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16]),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, [3, 32]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
        [w("Wg", 16, 32), w("bg", 16), w("Ws", 16, 16), w("Wm", 16, 16), w("Wo", 16, 16), w("E", 10, 32),
         w("Wc", 4, 2, 3, 3)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def custom_op_model(path: Path) -> Path:
    """One ``ox_quant.MatMulNBits`` node (channel groups of 4), for inspect: converting it
    needs the custom-op library."""
    k, n, block, group = 32, 16, 16, 4
    blocks = k // block
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="ox_quant", name="custom",
                              K=k, N=n, bits=4, block_size=block, channel_group_size=group)]
    graph = helper.make_graph(
        nodes, "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(np.full((n, blocks, block // 2), 0x88, np.uint8), "B"),
         numpy_helper.from_array(np.full(n // group * blocks, 0.01, np.float32), "S")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ox_quant", 1)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def build_bases(folder: Path) -> dict[str, Path]:
    """Valid small models (each loads in ONNX Runtime) that the mutations start from."""
    rng = np.random.default_rng(SEED)

    def weights(*dims: int) -> dict[str, np.ndarray]:
        return {f"W{i}": (rng.standard_normal((dims[i], dims[i + 1])) * 0.1).astype(np.float32)
                for i in range(len(dims) - 1)}

    bases = {
        "chain": matmul_model(folder / "chain.onnx", weights(32, 16, 32)),
        "fp16": matmul_model(folder / "fp16.onnx", weights(32, 32), dtype=np.float16, opset=17, ir_version=8),
        "mixed": mixed_model(folder / "mixed.onnx"),
        "external": matmul_model(folder / "external.onnx", weights(64, 16), external=True),
    }
    for name, src, flags in (
        ("nbits", "chain", ["--block-size", "16"]),
        ("qdq", "chain", ["--block-size", "-1", "--bits", "8"]),
        ("mixed_q", "mixed", ["--block-size", "16"]),  # MatMulNBits, GatherBlockQuantized, QDQ Conv
    ):
        out = folder / f"{name}.onnx"
        with pytest.raises(SystemExit) as done:
            main(["convert", str(bases[src]), "-o", str(out), *flags])
        assert done.value.code == 0
        bases[name] = out
    for path in bases.values():
        make_session(path)  # the starting points are valid
    bases["custom"] = custom_op_model(folder / "custom.onnx")  # valid, but ORT needs the library
    return bases


# ----------------------------------------------------------------------------------
# Mutations: each takes the serialized model and returns (bytes, description)

Mutation = Callable[[bytes, random.Random], tuple[bytes, str]]


def flip_bits(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    count = rng.choice([1, 2, 4, 16])
    for _ in range(count):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf), f"{count} bit flips"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncated at {cut}/{len(data)}"


def splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 32))
    how = rng.choice(["delete", "duplicate", "random"])
    if how == "delete":
        return data[:i] + data[j:], f"deleted bytes {i}:{j}"
    if how == "duplicate":
        return data[:j] + data[i:j] + data[j:], f"duplicated bytes {i}:{j}"
    return data[:i] + rng.randbytes(j - i) + data[j:], f"randomised bytes {i}:{j}"


def _proto_edit(edit: Callable[[onnx.ModelProto, random.Random], str]) -> Mutation:
    def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
        model = onnx.load_from_string(data)
        what = edit(model, rng)
        return model.SerializeToString(), what

    mutate.__name__ = edit.__name__
    return mutate


def _pick(rng: random.Random, items):  # type: ignore[no-untyped-def]
    return items[rng.randrange(len(items))]


@_proto_edit
def initializer_dims(model: onnx.ModelProto, rng: random.Random) -> str:
    t = _pick(rng, model.graph.initializer)
    how = rng.choice(["dim", "append", "drop", "clear"])
    if how == "dim" and t.dims:
        i = rng.randrange(len(t.dims))
        t.dims[i] = rng.choice([0, 1, t.dims[i] + 1, t.dims[i] - 1, t.dims[i] * 2, -1, 2**31, 10**12])
        return f"{t.name}.dims[{i}] = {t.dims[i]}"
    if how == "append":
        t.dims.append(rng.choice([1, 2]))
        return f"{t.name}.dims += [{t.dims[-1]}]"
    if how == "drop" and t.dims:
        t.dims.pop()
        return f"{t.name}.dims.pop()"
    del t.dims[:]
    return f"{t.name}.dims = []"


@_proto_edit
def io_dims(model: onnx.ModelProto, rng: random.Random) -> str:
    value = _pick(rng, list(model.graph.input) + list(model.graph.output))
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "no dims to edit"
    i = rng.randrange(len(dims))
    how = rng.choice(["value", "param", "clear", "drop"])
    if how == "value":
        dims[i].dim_value = rng.choice([0, 1, 3, 7, 10**9])
    elif how == "param":
        dims[i].dim_param = rng.choice(["n", "", "?"])
    elif how == "clear":
        dims[i].Clear()
    else:
        del dims[i]
    return f"{value.name} dim {i}: {how}"


@_proto_edit
def odd_attribute(model: onnx.ModelProto, rng: random.Random) -> str:
    node = _pick(rng, model.graph.node)
    if node.attribute and rng.random() < 0.7:
        attr = _pick(rng, node.attribute)
        how = rng.choice(["int", "ints", "float", "string", "type"])
        if how == "int":
            attr.i = rng.choice(ODD_INTS)
        elif how == "ints":
            del attr.ints[:]
            attr.ints.extend(rng.choice(ODD_INTS) for _ in range(rng.randrange(4)))
        elif how == "float":
            attr.f = rng.choice([float("nan"), float("inf"), -1.0])
        elif how == "string":
            attr.s = rng.choice([b"", b"\xff\xfe", b"NOTSET"])
        else:
            attr.type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 13])
        return f"{node.op_type}.{attr.name}: odd {how}"
    name = rng.choice(["K", "N", "bits", "block_size", "axis", "perm", "transA", "alpha", "foo"])
    node.attribute.append(helper.make_attribute(name, rng.choice(ODD_INTS)))
    return f"{node.op_type}: added {name}"


@_proto_edit
def delete_initializer(model: onnx.ModelProto, rng: random.Random) -> str:
    i = rng.randrange(len(model.graph.initializer))
    name = model.graph.initializer[i].name
    del model.graph.initializer[i]
    return f"deleted initializer {name}"


@_proto_edit
def duplicate_name(model: onnx.ModelProto, rng: random.Random) -> str:
    g = model.graph
    how = rng.choice(["initializer", "output", "input", "rename"])
    if how == "initializer":
        t = _pick(rng, g.initializer)
        g.initializer.append(t)
        return f"initializer {t.name} twice"
    if how == "output":
        node = _pick(rng, g.node)
        other = _pick(rng, [o for n in g.node for o in n.output] + [i.name for i in g.input])
        node.output[0] = other
        return f"{node.name}.output[0] = {other}"
    if how == "input":
        t = _pick(rng, g.initializer)
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return f"initializer {t.name} also a graph input"
    t = _pick(rng, g.initializer)
    other = _pick(rng, [i.name for i in g.initializer] + [i.name for i in g.input] + [o.name for o in g.output])
    old, t.name = t.name, other
    return f"initializer {old} renamed {other}"


@_proto_edit
def wrong_dtype(model: onnx.ModelProto, rng: random.Random) -> str:
    new = rng.choice(ODD_DTYPES)
    if rng.random() < 0.6:
        t = _pick(rng, model.graph.initializer)
        t.data_type = new
        return f"{t.name}.data_type = {new}"
    value = _pick(rng, list(model.graph.input) + list(model.graph.output))
    value.type.tensor_type.elem_type = new
    return f"{value.name}.elem_type = {new}"


@_proto_edit
def versions(model: onnx.ModelProto, rng: random.Random) -> str:
    how = rng.choice(["ir", "opset", "drop_opset", "twice", "ms_opset"])
    if how == "ir":
        model.ir_version = rng.choice([0, 1, 2, 3, 7, 13, 14, 15, 99])
        return f"ir_version = {model.ir_version}"
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if how == "opset":
        default.version = rng.choice([0, 1, 6, 7, 9, 17, 21, 26, 27, 28, 29, 1000])
        return f"opset = {default.version}"
    if how == "drop_opset":
        model.opset_import.remove(default)
        return "ai.onnx opset import removed"
    if how == "twice":
        model.opset_import.append(helper.make_opsetid("", 21))
        return "ai.onnx opset imported twice"
    model.opset_import.append(helper.make_opsetid("com.microsoft", rng.choice([0, 1, 99])))
    return "com.microsoft opset added"


@_proto_edit
def op_identity(model: onnx.ModelProto, rng: random.Random) -> str:
    node = _pick(rng, model.graph.node)
    how = rng.choice(["op", "domain", "inputs", "empty_input", "drop_input"])
    if how == "op":
        node.op_type = rng.choice(["Matmul", "MatMulNBits", "Gemm", "DequantizeLinear", "Conv", ""])
    elif how == "domain":
        node.domain = rng.choice(["com.microsoft", "ox_quant", "ai.onnx", "nope"])
    elif how == "inputs" and len(node.input) > 1:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    elif how == "empty_input" and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "nonexistent"])
    elif node.input:
        del node.input[-1]
    return f"{node.name or node.op_type}: {how} -> {node.domain}:{node.op_type}({', '.join(node.input)})"


def _inline_float_initializers(model: onnx.ModelProto) -> list[TensorProto]:
    """Float32/float16 initializers stored in the model file itself (not external data)."""
    return [
        t for t in model.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and t.data_location != TensorProto.EXTERNAL
    ]


@_proto_edit
def nonfinite_weight(model: onnx.ModelProto, rng: random.Random) -> str:
    floats = _inline_float_initializers(model)
    if not floats:
        return "no float initializer"
    t = _pick(rng, floats)
    array = numpy_helper.to_array(t).copy()
    value = rng.choice([np.nan, np.inf, -np.inf])
    array.flat[rng.randrange(array.size)] = value
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    return f"{t.name} gets {value}"


@_proto_edit
def external_info(model: onnx.ModelProto, rng: random.Random) -> str:
    ext = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not ext:
        return "no external tensor"
    t = _pick(rng, ext)
    entry = _pick(rng, t.external_data)
    if entry.key == "location":
        entry.value = rng.choice(["missing.bin", "../outside.data", "/etc/hostname", "", "."])
    else:
        entry.value = str(rng.choice([-1, 0, 1, 3, 10**12, 2**63]))
    return f"{t.name} external {entry.key} = {entry.value}"


@_proto_edit
def extreme_values(model: onnx.ModelProto, rng: random.Random) -> str:
    """Valid models with awkward but finite weights: zeros, constants, denormals, huge ranges."""
    floats = _inline_float_initializers(model)
    if not floats:
        return "no float initializer"
    t = _pick(rng, floats)
    array = numpy_helper.to_array(t).copy()
    info = np.finfo(array.dtype)
    how = rng.choice(["zeros", "constant", "denormal", "max", "alternating_max", "one_outlier"])
    if how == "zeros":
        array[...] = 0
    elif how == "constant":
        array[...] = rng.choice([-2.5, 1e-3, 7.0])
    elif how == "denormal":
        array[...] = info.smallest_subnormal * np.sign(array + 0.5)
    elif how == "max":
        array[...] = info.max
    elif how == "alternating_max":
        array.flat[::2] = info.max
        array.flat[1::2] = -info.max
    else:
        array.flat[rng.randrange(array.size)] = info.max / 2
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    return f"{t.name}: {how}"


@_proto_edit
def typed_storage(model: onnx.ModelProto, rng: random.Random) -> str:
    """The same float32 values in ``float_data`` instead of ``raw_data`` (valid either way)."""
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and t.HasField("raw_data")]
    if not floats:
        return "no raw float32 initializer"
    t = _pick(rng, floats)
    array = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(array.reshape(-1).tolist())
    return f"{t.name} stored in float_data"


@_proto_edit
def metadata(model: onnx.ModelProto, rng: random.Random) -> str:
    node = _pick(rng, model.graph.node)
    key = rng.choice(["ox_quant.granularity", "ox_quant.bits", "other"])
    value = rng.choice(["", "block", "block:", "block:0", "block:-3", "block:x", "channel:7", "rows", "²", "99", "-1"])
    entry = next((e for e in node.metadata_props if e.key == key), None) or node.metadata_props.add(key=key)
    entry.value = value
    return f"{node.name}.metadata[{key}] = {value!r}"


BYTE_MUTATIONS: list[Mutation] = [flip_bits, truncate, splice]
PROTO_MUTATIONS: list[Mutation] = [
    initializer_dims, io_dims, odd_attribute, delete_initializer, duplicate_name, wrong_dtype, versions,
    op_identity, nonfinite_weight, metadata, extreme_values, typed_storage,
]
BASE_NAMES = ["chain", "fp16", "mixed", "external", "nbits", "qdq", "mixed_q", "custom"]
N_CASES = 400


def case_plan(i: int) -> tuple[str, str]:
    """(base model, mutation name) of case ``i``: a fixed, balanced schedule."""
    rng = random.Random(SEED + i)
    base = BASE_NAMES[i % len(BASE_NAMES)]
    pool = BYTE_MUTATIONS + PROTO_MUTATIONS + ([external_info, external_info] if base == "external" else [])
    return base, rng.choice(pool).__name__


MUTATIONS = {m.__name__: m for m in BYTE_MUTATIONS + PROTO_MUTATIONS + [external_info]}


# ----------------------------------------------------------------------------------
# Running cases


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):  # type: ignore[no-untyped-def]
    raise CaseTimeout()






def check_output_loads(path: Path) -> None:
    """ONNX Runtime loads a converted model (``make_session`` raises with its reason if not).

    A model with ox-quant's custom op loads only with the custom-op library; where it is not
    built (tests/test_custom_ops_cpu.py builds it), the model is held to onnx's checker and
    ox-quant's own validation instead.
    """
    from ox_quant.formats.custom_matmul import DOMAIN as CUSTOM_DOMAIN
    from ox_quant.runtime.session import model_domains

    if CUSTOM_DOMAIN in model_domains(path) and not library_available():
        onnx.checker.check_model(str(path), full_check=True)
        load_model(path)
        return
    make_session(path)


def check_failure_line(code: int, err: str, context: str) -> None:
    """Exit 0, or exit 1 with exactly one ``ox-quant: error:`` line (ox-quant's own validation)."""
    assert code in (0, 1), f"{context}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{context}: traceback\n{err}"
    assert "internal error" not in err, f"{context}: hit the last-resort handler: {err}"
    if code == 1:
        assert err.count("\n") == 1 and err.startswith("ox-quant: error: "), f"{context}: stderr {err!r}"
        assert len(err.strip()) > len("ox-quant: error: ") + 10, f"{context}: no reason given: {err!r}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    return build_bases(tmp_path_factory.mktemp("fuzz-bases"))


def make_case(bases: dict[str, Path], i: int, folder: Path) -> tuple[Path, str, list[str]]:
    """Write case ``i``'s mutated model (and its external data) into ``folder``."""
    base, mutation = case_plan(i)
    rng = random.Random(SEED * 7919 + i)
    src = bases[base]
    model_path = folder / "model.onnx"
    if base == "external":  # keep the data file's name: the model refers to it
        data = src.with_name(src.name + ".data").read_bytes()
        model_path = folder / src.name
        if mutation == "nonfinite_weight":  # the weights live in the data file
            value = rng.choice([np.nan, np.inf, -np.inf])
            at = rng.randrange(len(data) // 4) * 4
            data = data[:at] + np.float32(value).tobytes() + data[at + 4 :]
            mutation += f"+{value} at data byte {at}"
        elif rng.random() < 0.25:
            data = data[: rng.randrange(len(data))]
            mutation += "+short data"
        (folder / (src.name + ".data")).write_bytes(data)
    mutated, what = MUTATIONS[case_plan(i)[1]](src.read_bytes(), rng)
    model_path.write_bytes(mutated)
    return model_path, f"case {i} ({base}, {mutation}: {what})", rng.choice(FLAG_SETS)


def run_in_process(capfd, argv: list[str], context: str) -> tuple[int, str, str]:
    """``ox-quant argv`` in this process, with a time budget; warnings count as output."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_BUDGET_S)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) as done:
                main(argv)
    except CaseTimeout:
        pytest.fail(f"{context}: ox-quant {argv[0]} ran over {CASE_BUDGET_S} s")
    finally:
        signal.alarm(0)
    out, err = capfd.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, f"{context}: warnings {[str(w.message) for w in shown]}"
    return done.value.code, out, err


def check_case(capfd, model_path: Path, context: str, flags: list[str]) -> tuple[int, int, str]:
    folder = model_path.parent
    before = {p.name: digest(p) for p in folder.iterdir()}
    out_dir = folder / "out"
    out_dir.mkdir()
    output = out_dir / "q.onnx"
    code, _, err = run_in_process(capfd, ["convert", str(model_path), "-o", str(output), *flags], context)
    check_failure_line(code, err, f"{context} convert {flags}")
    if code == 0:
        check_output_loads(output)
    else:
        assert list(out_dir.iterdir()) == [], f"{context}: failed convert left {list(out_dir.iterdir())}"
    icode, iout, ierr = run_in_process(capfd, ["inspect", str(model_path), "--json"], context)
    check_failure_line(icode, ierr, f"{context} inspect")
    if icode == 0:
        json.loads(iout)
    assert {p.name: digest(p) for p in folder.iterdir() if p.is_file()} == before, f"{context}: input changed"
    return code, icode, err.strip() or ierr.strip()


@pytest.mark.parametrize("first", range(0, N_CASES, 40), ids=lambda f: f"cases{f}-{f + 39}")
def test_fuzz_in_process(bases, tmp_path, capfd, first):
    """40 cases per test; each case's id, mutation and flags are in any failure message."""
    outcomes = []
    for i in range(first, first + 40):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        model_path, context, flags = make_case(bases, i, folder)
        outcomes.append(check_case(capfd, model_path, context, flags))
    # The schedule exercises both outcomes: not everything is rejected, not everything passes.
    assert any(c == 0 for c, _, _ in outcomes) and any(c == 1 for c, _, _ in outcomes)


SUBPROCESS_CASES = [3, 11, 26, 58, 101, 143]


def test_fuzz_subprocess(bases, tmp_path):
    """A few cases through the real entry point, in parallel, each under a hard timeout."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    running = []
    for i in SUBPROCESS_CASES:
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        model_path, context, flags = make_case(bases, i, folder)
        for command in (["convert", str(model_path), "-o", str(folder / "out.onnx"), *flags], ["inspect", str(model_path)]):
            proc = subprocess.Popen(
                [sys.executable, "-m", "ox_quant.cli", *command], cwd=REPO, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            running.append((proc, context, command[0], folder))
    for proc, context, command, folder in running:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{context}: ox-quant {command} hung")
        check_failure_line(proc.returncode, err, f"{context} {command}")
        if command == "convert" and proc.returncode == 0:
            check_output_loads(folder / "out.onnx")
        assert not list(folder.glob(".ox-quant-*"))
