"""Where the project's public-domain text lives (perplexity and calibration text).

Resolution order: an explicit directory, then the ``OX_QUANT_TEXT_DIR`` environment
variable, then the texts shipped inside the package, ``ox_quant/data/text/`` (four
Jane Austen novels, public domain, UTF-8, gzip-compressed; installed with the package,
so no checkout layout is assumed). A text file the user names (``--text FILE``) is read
with :func:`read_text` and bypasses the directory. ``*.txt`` and ``*.txt.gz`` files
are both read, the latter decompressed transparently.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from ox_quant.errors import OxQuantError

ENV_VAR = "OX_QUANT_TEXT_DIR"
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "text"  # ox_quant/data/text
SUFFIXES = (".txt", ".txt.gz")


def text_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory of texts to use; OxQuantError when it does not exist."""
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
    if not BUNDLED.is_dir():
        raise OxQuantError(
            f"the texts shipped with ox-quant are missing ({BUNDLED}): reinstall ox-quant, "
            f"set {ENV_VAR} or pass a text file"
        )
    return BUNDLED


def text_files(explicit_dir: str | os.PathLike | None = None) -> list[Path]:
    """The ``*.txt`` and ``*.txt.gz`` files of :func:`text_dir`, sorted by :func:`text_name`."""
    directory = text_dir(explicit_dir)
    files = sorted((p for p in directory.iterdir() if p.is_file() and p.name.endswith(SUFFIXES)), key=text_name)
    if not files:
        raise OxQuantError(f"no .txt or .txt.gz files in {directory}")
    return files


def text_name(path: str | os.PathLike) -> str:
    """The file name without a ``.gz`` suffix (``emma.txt.gz`` -> ``emma.txt``), as reports show it."""
    name = Path(path).name
    return name[:-3] if name.endswith(".gz") else name


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, gunzipped when its name ends in ``.gz``; OxQuantError with one line if it cannot be read."""
    p = Path(path)
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                return f.read().decode("utf-8")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OxQuantError(f"text file {p} does not exist") from None
    except UnicodeDecodeError as exc:
        raise OxQuantError(f"text file {p} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise OxQuantError(f"text file {p} is not a valid gzip file: {exc or type(exc).__name__}") from None
    except OSError as exc:
        raise OxQuantError(f"cannot read text file {p}: {exc.strerror}") from None
