"""``ox-quant study``: a CI-sized study of CREPE tiny through the CLI, and the claim rules on made-up rows."""

from __future__ import annotations

import json

import pytest

from ox_quant.core.config import Block, ChannelGroup, Format, PerChannel, PerTensor, QuantConfig
from ox_quant.errors import OxQuantError
from ox_quant.study.claims import evaluate_claims
from ox_quant.study.peer import peer_arguments
from ox_quant.study.rows import Row, StudyOptions, StudyResult, mark_partial, parse_bits_list, parse_granularity_list
from ox_quant_models.tasks import study_facts
from tests.real_models import ox_quant, require

pytestmark = [pytest.mark.slow, pytest.mark.models]

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

needs_crepe = require("torchcrepe", "torchcrepe")
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (pip install '.[models]')")


# ------------------------------------------------------------------ CI-sized study of CREPE tiny


@pytest.fixture(scope="module")
def crepe_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "crepe"
    proc = ox_quant("study", "crepe-tiny", "--bits", "4,3", "--granularity", "tensor,block:64",
                    "--format", "qdq", "--keep-models", "--out", str(out), "--json")
    return out, json.loads(proc.stdout)


@needs_crepe
@needs_matplotlib
def test_study_writes_report_json_and_plots(crepe_study):
    out, data = crepe_study
    assert json.loads((out / "study.json").read_text())["rows"] == data["rows"]
    text = (out / "study.md").read_text()
    assert "## Claims" in text and "Per-channel INT8 is near lossless." in text
    assert "change vs fp32 (lower is better)" in text
    for name in ("metric_vs_bpw.png", "metric_vs_bpw_4bit_and_up.png"):
        from PIL import Image

        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200
    kept = sorted(p.name for p in (out / "models").iterdir())  # --keep-models
    assert "crepe-tiny.onnx" in kept and "crepe-tiny.int4.block64.onnx" in kept
    assert [c["key"] for c in data["claims"]] == ["int8-tensor-loses", "int8-channel-lossless", "int4-needs-groups",
                                                  "group128-balance", "channel-group-between"]
    assert data["claims"][0]["verdict"] == "not tested"  # no int8 row in this study
    assert "int8 tensor" in data["claims"][0]["evidence"]


@needs_crepe
@needs_matplotlib
def test_inexpressible_configs_are_rows_with_reasons(crepe_study):
    _, data = crepe_study
    ours = {r["label"]: r for r in data["rows"]}
    peer = {r["label"]: r for r in data["peer_rows"]}
    assert list(ours) == list(peer) == ["int4 tensor", "int4 block:64", "int3 tensor", "int3 block:64"]
    for label in ("int3 tensor", "int3 block:64"):  # QDQ holds 4 or 8 bits only
        assert ours[label]["status"] == "refused" and "4- or 8-bit" in ours[label]["reason"]
        assert peer[label]["status"] == "not supported"
    assert "not 3" in peer["int3 block:64"]["reason"]
    assert peer["int4 tensor"]["status"] == "not supported" and "no tensor scales" in peer["int4 tensor"]["reason"]
    # the peer quantizes MatMul only; CREPE's dense layer is a Gemm
    assert peer["int4 block:64"]["status"] == "not supported"
    assert "MatMul weights only" in peer["int4 block:64"]["reason"]
    assert ours["int4 block:64"]["status"] == "ok" and ours["int4 block:64"]["weights_quantized"] == 7


@needs_crepe
@needs_matplotlib
def test_numbers_match_a_direct_convert_and_evaluate(crepe_study, tmp_path):
    from ox_quant.pipeline.convert import ConvertOptions, convert
    from ox_quant.pipeline.policy import UNIFORM
    from ox_quant.pipeline.selection import Selection
    from ox_quant.study.measure import scale_bytes
    from ox_quant.study.rows import DEFAULT_OPS
    from ox_quant_models.tasks.pitch import evaluate

    out, data = crepe_study
    row = next(r for r in data["rows"] if r["label"] == "int4 block:64")
    src = out / "models" / "crepe-tiny.onnx"  # the study's own fp32 export (--keep-models)
    report = convert(src, tmp_path / "q.onnx", ConvertOptions(
        config=QuantConfig(bits=4, granularity=Block(64), symmetric=True, format=Format.QDQ), selection=Selection(include_ops=DEFAULT_OPS),
        policy=UNIFORM))  # the study's policy: every weight at the row's config
    fp32, quantized = evaluate(src), evaluate(tmp_path / "q.onnx")
    assert data["fp32"]["value"] == pytest.approx(fp32.metrics["cents_error_mean"], rel=1e-9)
    assert row["value"] == pytest.approx(quantized.metrics["cents_error_mean"], rel=1e-9)
    assert row["change"] == pytest.approx(quantized.metrics["cents_error_mean"] - fp32.metrics["cents_error_mean"], rel=1e-6)
    assert row["bits_per_weight"] == pytest.approx(report.bits_per_weight, rel=1e-12)
    assert row["scale_bytes"] == scale_bytes(tmp_path / "q.onnx")[0]
    assert row["metrics"]["raw_pitch_accuracy"] == quantized.metrics["raw_pitch_accuracy"]


@pytest.mark.parametrize("args, message", [
    (["nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["minilm", "--tokens", "64"], "--tokens only apply to smollm2"),
    (["minilm", "--bits", "9"], "bits must be between 2 and 8"),
    (["minilm", "--granularity", "rows"], "unknown granularity"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    proc = ox_quant("study", *args, "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


# ------------------------------------------------------------------ rules, on made-up rows


def test_parse_lists():
    assert parse_bits_list("8,4,3,2") == (8, 4, 3, 2)
    assert parse_granularity_list("tensor,channel-group:128,channel,block:32") == (
        PerTensor(), ChannelGroup(128), PerChannel(), Block(32))
    with pytest.raises(OxQuantError):
        parse_bits_list("8,x")


@pytest.mark.parametrize("config, expected", [
    (QuantConfig(bits=4, granularity=Block(128)), {"bits": 4, "block_size": 128, "quant_format": "QOperator"}),
    (QuantConfig(bits=2, granularity=Block(16)), {"bits": 2, "block_size": 16}),
    (QuantConfig(bits=4, granularity=PerChannel()), {"quant_format": "QDQ", "channel_wised_quantize": True}),
    (QuantConfig(bits=3, granularity=Block(128)), "not 3"),
    (QuantConfig(bits=4, granularity=Block(48)), "power of two"),
    (QuantConfig(bits=8, granularity=PerChannel()), "4-bit QDQ"),
    (QuantConfig(bits=8, granularity=PerTensor()), "no tensor scales"),
    (QuantConfig(bits=4, granularity=ChannelGroup(128)), "no channel-group scales"),
])
def test_peer_arguments(config, expected):
    got = peer_arguments(config)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got and got.startswith("not supported by MatMulNBitsQuantizer")
    else:
        assert isinstance(got, dict) and expected.items() <= got.items()


def _row(bits: int, gran: str, value: float, fp32: float = 10.0, weights: int = 5, symmetric: bool = True) -> Row:
    m = study_facts("smollm2").metric
    bpw = bits + (0.0 if gran == "tensor" else 0.25)
    return Row(tool="ox-quant", label=f"int{bits} {gran}", bits=bits, granularity=gran, symmetric=symmetric,
               status="ok", value=value, change=m.change(value, fp32), loss=m.loss(value, fp32),
               bits_per_weight=bpw, weights_quantized=weights)


def _result(rows: list[Row]) -> StudyResult:
    fp32 = Row(tool="fp32", label="fp32", bits=None, granularity=None, symmetric=None, status="ok", value=10.0)
    return StudyResult(model="smollm2", metric=study_facts("smollm2").metric, options=StudyOptions(model="smollm2"),
                       fp32=fp32, rows=tuple(rows), peer_rows=(), claims=(), notes=(), details={},
                       environment={}, seconds=0.0)


def test_claims_follow_the_stated_thresholds():
    # smollm2 thresholds: near lossless <= 1 %, noticeable >= 3 % (relative perplexity)
    rows = [_row(8, "tensor", 10.5), _row(8, "channel", 10.05), _row(8, "channel-group:128", 10.2),
            _row(4, "tensor", 40.0), _row(4, "channel", 12.0), _row(4, "channel-group:128", 13.0),
            _row(4, "block:256", 10.6), _row(4, "block:128", 10.25), _row(4, "block:64", 10.2),
            _row(4, "block:32", 10.15)]
    claims = {c.key: c for c in evaluate_claims(_result(rows))}
    assert claims["int8-tensor-loses"].verdict == "holds"  # +5 %
    assert claims["int8-channel-lossless"].verdict == "holds"  # +0.5 %
    assert claims["int4-needs-groups"].verdict == "holds"  # channel +20 %, best block +1.5 %
    assert claims["group128-balance"].verdict == "holds"  # finer gains 1 %, block:256 costs 3.5 %
    assert claims["channel-group-between"].verdict == "holds"
    assert "+5.00%" not in claims["int8-tensor-loses"].evidence and "5.00%" in claims["int8-tensor-loses"].evidence

    rows[0] = _row(8, "tensor", 10.01)  # per-tensor int8 barely moves
    rows[2] = _row(8, "channel-group:128", 10.03)  # between at int8 ...
    rows[5] = _row(4, "channel-group:128", 50.0)  # ... worse than per-tensor at int4
    claims = {c.key: c for c in evaluate_claims(_result(rows))}
    assert claims["int8-tensor-loses"].verdict == "does not hold"
    assert claims["channel-group-between"].verdict == "partly holds"

    rows[4] = _row(4, "channel", 10.2)  # per-channel int4 already fine: groups are not needed
    assert next(c for c in evaluate_claims(_result(rows)) if c.key == "int4-needs-groups").verdict == "does not hold"
    rows = [_row(4, "channel", 20.0), _row(4, "block:32", 19.95)]  # blocks do not help
    claim = next(c for c in evaluate_claims(_result(rows)) if c.key == "int4-needs-groups")
    assert claim.verdict == "does not hold" and "do not help" in claim.evidence


def test_smollm2_int4_block32_asymmetric_never_supports_a_claim():
    rows = [_row(4, "channel", 12.0, symmetric=False), _row(4, "block:32", 10.0, symmetric=False)]
    claim = next(c for c in evaluate_claims(_result(rows)) if c.key == "int4-needs-groups")
    assert claim.verdict == "not tested"  # the only block row is the excluded one


def test_rows_with_fewer_weights_are_partial():
    rows = [_row(4, "channel", 12.0, weights=7), _row(3, "channel", 14.0, weights=1)]
    rows[1] = Row(**{**rows[1].as_dict(), "skipped": (("Conv weights are written as QDQ", 6),)})
    marked = mark_partial(rows)
    assert marked[0].status == "ok"
    assert marked[1].status == "partial" and "1 of 7 weights" in marked[1].reason and "(x6)" in marked[1].reason


@needs_crepe
@needs_matplotlib
def test_report_only_rewrites_the_report_from_study_json(crepe_study):
    out, data = crepe_study
    (out / "study.md").unlink()
    ox_quant("study", "crepe-tiny", "--out", str(out), "--report-only")
    text = (out / "study.md").read_text()
    assert data["command"] in text
    assert json.loads((out / "study.json").read_text())["claims"] == data["claims"]
    proc = ox_quant("study", "minilm", "--out", str(out), "--report-only", check=False)
    assert proc.returncode == 1 and "is a study of 'crepe-tiny'" in proc.stderr
