"""Missing or broken dependencies: ONNX Runtime (either PyPI package, neither, or a clash of
both) and PyPI's pyyaml give one line naming what to install, and the CLI exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ox_quant.errors import OxQuantError
from ox_quant.runtime import ort
from tests.helpers import matmul_model, random_weights

REPO = Path(__file__).resolve().parents[1]


def fake_site(root: Path, *, dists: tuple[str, ...], init: str | None) -> Path:
    """A site directory holding an ``onnxruntime/`` package and ``*.dist-info`` for ``dists``.

    ``init=None`` leaves ``onnxruntime/`` without ``__init__.py`` (what uninstalling one of two
    ORT packages leaves behind: a leftover provider library, imported as a namespace package).
    """
    site = root / "site"
    package = site / "onnxruntime"
    (package / "capi").mkdir(parents=True)
    (package / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    if init is not None:
        (package / "__init__.py").write_text(init)
    for dist in dists:
        info = site / f"{dist.replace('-', '_')}-1.31.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.31.1\n")
    return site


def namespace_module(package: Path) -> types.ModuleType:
    """What ``import onnxruntime`` gives for a directory without ``__init__.py``."""
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("onnxruntime", [str(package.parent)])
    assert spec is not None and spec.origin in (None, "namespace")
    return importlib.util.module_from_spec(spec)


# ---------------------------------------------------------------- ox_quant.runtime.ort.load, in process
def test_load_returns_the_working_module():
    module = ort.load()
    assert module.__name__ == "onnxruntime" and hasattr(module, "InferenceSession")
    assert ort.installed(), "a working onnxruntime module is owned by one of the two distributions"


def test_not_installed_says_which_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` -> ModuleNotFoundError
    monkeypatch.setattr(ort, "installed", lambda dirs=None: [])
    with pytest.raises(OxQuantError) as info:
        ort.load()
    assert str(info.value) == ("ONNX Runtime is not installed: run pip install onnxruntime (CPU) "
                               "or pip install onnxruntime-gpu (NVIDIA GPU)")


def test_registered_but_missing_module_says_reinstall(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(ort, "installed", lambda dirs=None: ["onnxruntime-gpu"])
    with pytest.raises(OxQuantError, match=r"run pip install --force-reinstall --no-deps onnxruntime-gpu$"):
        ort.load()


@pytest.mark.parametrize(
    "dists, command",
    [
        (("onnxruntime-gpu",), "pip install --force-reinstall --no-deps onnxruntime-gpu"),
        (("onnxruntime",), "pip install --force-reinstall --no-deps onnxruntime"),
        (("onnxruntime", "onnxruntime-gpu"), "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"),
    ],
)
def test_leftover_directory_names_the_owner(tmp_path, monkeypatch, dists, command):
    site = fake_site(tmp_path, dists=dists, init=None)
    monkeypatch.syspath_prepend(str(site))  # importlib.metadata finds the fake dist-info here
    monkeypatch.setitem(sys.modules, "onnxruntime", namespace_module(site / "onnxruntime"))
    with pytest.raises(OxQuantError) as info:
        ort.load()
    message = str(info.value)
    assert message.startswith("ONNX Runtime is broken: its onnxruntime directory holds only leftover files")
    assert f"run {command}" in message and "\n" not in message


def test_installed_ignores_distributions_of_other_directories(tmp_path, monkeypatch):
    site = fake_site(tmp_path, dists=("onnxruntime",), init=None)
    monkeypatch.syspath_prepend(str(site))
    assert "onnxruntime" in ort.installed([site / "onnxruntime"])
    assert ort.installed([tmp_path / "elsewhere" / "onnxruntime"]) == []


def test_import_error_inside_the_package_says_reinstall(monkeypatch):
    def fail(name, *args, **kwargs):
        raise ImportError("libonnxruntime.so.1: cannot open shared object file")

    monkeypatch.setattr(ort.importlib, "import_module", fail)
    monkeypatch.setattr(ort, "installed", lambda dirs=None: ["onnxruntime"])
    with pytest.raises(OxQuantError, match=r"cannot be imported \(libonnxruntime.so.1: .*\): run pip install "
                                           r"--force-reinstall --no-deps onnxruntime$"):
        ort.load()


@pytest.mark.parametrize(
    "owners, providers, expected",
    [
        (["onnxruntime"], ["CPUExecutionProvider"], "CPU-only build (run pip uninstall -y onnxruntime && pip install onnxruntime-gpu)"),
        (["onnxruntime-gpu", "onnxruntime"], ["CPUExecutionProvider"], "onnxruntime was installed after onnxruntime-gpu"),
        (["onnxruntime-gpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"], "no CUDA device or runtime"),
    ],
)
def test_cuda_hint(monkeypatch, owners, providers, expected):
    module = types.ModuleType("onnxruntime")
    module.__path__ = []
    module.InferenceSession = module.SessionOptions = object
    module.get_available_providers = lambda: providers
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    monkeypatch.setattr(ort, "installed", lambda dirs=None: owners)
    assert expected in ort.cuda_hint()


# ---------------------------------------------------------------- the CLI, in a subprocess
@pytest.fixture()
def model(tmp_path) -> Path:
    return matmul_model(tmp_path / "model.onnx", random_weights(np.random.default_rng(2), 64, 32))


def run_cli(args: list[str], *, pythonpath: list[Path], prelude: str = "") -> subprocess.CompletedProcess:
    """``ox-quant ARGS`` in a fresh interpreter, after ``prelude`` (Python source) has run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in [*pythonpath, REPO]))
    code = f"import sys\n{prelude}\nfrom ox_quant.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ox-quant: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_cli_without_onnxruntime(model):
    prelude = ("sys.modules['onnxruntime'] = None\n"
               "import ox_quant.runtime.ort\nox_quant.runtime.ort.installed = lambda dirs=None: []")
    proc = run_cli(["convert", str(model)], pythonpath=[], prelude=prelude)
    assert_one_line(proc, "ONNX Runtime is not installed: run pip install onnxruntime (CPU) or pip install onnxruntime-gpu")
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]


def test_cli_with_module_lacking_session_options(tmp_path, model):
    """An ``onnxruntime`` package shadowing the real one but without its API (first on the path)."""
    site = fake_site(tmp_path, dists=("onnxruntime-gpu",), init="")
    proc = run_cli(["convert", str(model)], pythonpath=[site])
    assert_one_line(proc, "module onnxruntime has no InferenceSession",
                    "run pip install --force-reinstall --no-deps onnxruntime-gpu")
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "site"]


def test_cli_with_package_missing_its_native_module(tmp_path, model):
    """``__init__.py`` present but the compiled module gone (the other package's uninstall took it)."""
    site = fake_site(tmp_path, dists=("onnxruntime",), init="from onnxruntime.capi._pybind_state import SessionOptions\n")
    proc = run_cli(["convert", str(model)], pythonpath=[site])
    assert_one_line(proc, "ONNX Runtime is installed incompletely (No module named 'onnxruntime.capi._pybind_state')",
                    "run pip install --force-reinstall --no-deps onnxruntime")
    assert "onnxruntime-gpu" not in proc.stderr  # the system's other ORT package lives elsewhere


def test_cli_with_leftover_directory_of_two_packages(tmp_path, model):
    """The reported state: both ORT packages installed, one uninstalled, a namespace package left."""
    site = fake_site(tmp_path, dists=("onnxruntime", "onnxruntime-gpu"), init=None)
    prelude = ("import importlib.machinery, importlib.util\n"
               f"spec = importlib.machinery.PathFinder.find_spec('onnxruntime', [{str(site)!r}])\n"
               "sys.modules['onnxruntime'] = importlib.util.module_from_spec(spec)")
    proc = run_cli(["verify", str(model), str(model)], pythonpath=[site], prelude=prelude)
    assert_one_line(proc, "only leftover files", "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


# ---------------------------------------------------------------- pyyaml
def test_yaml_recipe_without_pyyaml_names_the_package(model, monkeypatch, capsys):
    from ox_quant.cli import main

    recipe = model.with_name("recipe.yaml")
    recipe.write_text("rules:\n  - match: '.*'\n    bits: 8\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(SystemExit) as info:
        main(["convert", str(model), "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert err == ("ox-quant: error: recipe recipe.yaml: reading YAML needs PyYAML: run pip install pyyaml "
                   "(or write the recipe as .json)\n")
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "recipe.yaml"]


def test_pyyaml_is_a_base_dependency():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.lower().startswith("pyyaml") for dep in project["dependencies"])
    assert not any(dep.startswith("onnxruntime") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
