"""Where the project's public-domain text lives (perplexity and calibration text).

Resolution order: an explicit path, then the ``OX_QUANT_TEXT_DIR`` environment
variable, then the nearest ``shared/data/text`` found beside the repository root
or beside one of its parent directories (CI checks out ``repo/`` with
``shared/`` next to it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ox_quant.errors import OxQuantError

ENV_VAR = "OX_QUANT_TEXT_DIR"
RELATIVE = Path("shared") / "data" / "text"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def text_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory of ``*.txt`` files to use; OxQuantError when none is found."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise OxQuantError(f"text directory {path} does not exist")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise OxQuantError(f"{ENV_VAR}={env} is not a directory")
        return path
    for base in [repo_root(), *repo_root().parents]:
        candidate = base / RELATIVE
        if candidate.is_dir():
            return candidate
        if base.parent == base:
            break
    raise OxQuantError(
        f"no text directory found: expected {RELATIVE} beside the checkout; "
        f"set {ENV_VAR} or pass a text file"
    )


def text_files(explicit_dir: str | os.PathLike | None = None) -> list[Path]:
    """Sorted ``*.txt`` files of :func:`text_dir`."""
    files = sorted(text_dir(explicit_dir).glob("*.txt"))
    if not files:
        raise OxQuantError(f"no .txt files in {text_dir(explicit_dir)}")
    return files


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; OxQuantError with one line if it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OxQuantError(f"text file {p} does not exist") from None
    except UnicodeDecodeError as exc:
        raise OxQuantError(f"text file {p} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise OxQuantError(f"cannot read text file {p}: {exc.strerror}") from None
