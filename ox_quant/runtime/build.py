"""Building the native custom-op libraries (``custom_ops/``) with CMake.

ONNX Runtime's C/C++ API headers come from, in order: ``$ORT_INCLUDE_DIR``; a system install
(``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``, ...); a cache of Debian's
``libonnxruntime-dev`` package (ONNX Runtime 1.21 headers, C API 21), fetched once with
``apt-get download`` against a temporary sources list and temporary state directories (the
system's apt configuration is not touched). A library built against C API 21 loads in any
newer ONNX Runtime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ox_quant.errors import OxQuantError
from ox_quant.runtime.custom_ops import CPU_LIBRARY, CUDA_LIBRARY, LIB_DIR

HEADER = "onnxruntime_cxx_api.h"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM_HEADER_DIRS = (
    "/usr/include/onnxruntime",
    "/usr/local/include/onnxruntime",
    "/usr/include/onnxruntime/core/session",
    "/usr/local/include/onnxruntime/core/session",
    "/usr/include",
    "/usr/local/include",
)


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_ops` produced: installed library paths, headers used, timings (s)."""

    libraries: list[Path]
    ort_include_dir: Path
    header_source: str
    seconds: float
    cuda_skipped: str | None = None  # why the CUDA library was not built, if it was not
    steps: dict[str, float] = field(default_factory=dict)


def source_dir() -> Path:
    """``custom_ops/`` of this checkout."""
    path = Path(__file__).resolve().parents[2] / "custom_ops"
    if not (path / "CMakeLists.txt").is_file():
        raise OxQuantError(f"custom-op sources not found at {path} (an installed wheel has no sources: build from a checkout)")
    return path


def cache_dir() -> Path:
    """``$OX_QUANT_CACHE`` or ``$XDG_CACHE_HOME/ox-quant`` or ``~/.cache/ox-quant``."""
    env = os.environ.get("OX_QUANT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ox-quant"


def _has_headers(path: Path) -> bool:
    return (path / HEADER).is_file() and (path / "onnxruntime_c_api.h").is_file()


def find_ort_headers(download: bool = True) -> tuple[Path, str]:
    """Directory holding ONNX Runtime's C/C++ API headers, and where it came from."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        if not _has_headers(Path(env)):
            raise OxQuantError(f"ORT_INCLUDE_DIR={env} does not hold {HEADER} and onnxruntime_c_api.h")
        return Path(env), "ORT_INCLUDE_DIR"
    for candidate in SYSTEM_HEADER_DIRS:
        if _has_headers(Path(candidate)):
            return Path(candidate), "system"
    cached = cache_dir() / "ort-headers" / "include"
    if _has_headers(cached):
        return cached, f"cache ({DEBIAN_PACKAGE})"
    if not download:
        raise OxQuantError(f"ONNX Runtime headers not found: set ORT_INCLUDE_DIR to the directory holding {HEADER}")
    return fetch_debian_headers(cached.parent), f"downloaded ({DEBIAN_PACKAGE} from Debian {DEBIAN_SUITE})"


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise OxQuantError(f"{what}: {cmd[0]} not found") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise OxQuantError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout


def fetch_debian_headers(dest: Path) -> Path:
    """Fetch Debian's ``libonnxruntime-dev`` into ``dest`` and return ``dest/include``.

    apt-get runs with a temporary sources list, lists and cache directories: nothing of the
    system's apt state changes. Needs network access to the Debian mirror
    (``$OX_QUANT_DEBIAN_MIRROR``, default deb.debian.org).
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise OxQuantError(f"ONNX Runtime headers not found and no apt-get/dpkg to fetch them: set ORT_INCLUDE_DIR to the directory holding {HEADER}")
    mirror = os.environ.get("OX_QUANT_DEBIAN_MIRROR", DEBIAN_MIRROR)
    with tempfile.TemporaryDirectory(prefix="oxq-apt-") as tmp_name:
        tmp = Path(tmp_name)
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d", "dl"):
            (tmp / sub).mkdir(parents=True)
        signed = f"signed-by={DEBIAN_KEYRING}" if DEBIAN_KEYRING.is_file() else ""
        (tmp / "etc/sources.list").write_text(f"deb [{signed}] {mirror} {DEBIAN_SUITE} main\n" if signed else f"deb {mirror} {DEBIAN_SUITE} main\n")
        opts = [
            f"-oDir::Etc::sourcelist={tmp}/etc/sources.list",
            f"-oDir::Etc::sourceparts={tmp}/etc/sources.list.d",
            f"-oDir::Etc::preferencesparts={tmp}/etc/preferences.d",
            f"-oDir::State::Lists={tmp}/lists",
            f"-oDir::Cache={tmp}/cache",
            "-oDebug::NoLocking=1",
            "-qq",
        ]
        if os.geteuid() == 0:  # root: apt would hand downloads to _apt, which cannot write here
            opts.append("-oAPT::Sandbox::User=root")
        _run(["apt-get", *opts, "update"], f"apt-get update (Debian {DEBIAN_SUITE}, temporary lists)")
        _run(["apt-get", *opts, "download", DEBIAN_PACKAGE], f"apt-get download {DEBIAN_PACKAGE}", cwd=tmp / "dl")
        debs = sorted((tmp / "dl").glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise OxQuantError(f"apt-get download {DEBIAN_PACKAGE} produced no .deb")
        _run(["dpkg", "-x", str(debs[0]), str(tmp / "x")], "dpkg -x")
        headers = tmp / "x/usr/include/onnxruntime"
        if not _has_headers(headers):
            raise OxQuantError(f"{debs[0].name} holds no {HEADER}")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(headers, staging / "include")
        (staging / "SOURCE").write_text(debs[0].name + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest / "include"


def nvcc_path() -> str | None:
    """nvcc on PATH, or under $CUDA_HOME / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin/nvcc").is_file():
            return str(Path(root) / "bin/nvcc")
    return None


def build_ops(
    cuda: bool | None = None,
    build_dir: Path | None = None,
    out_dir: Path | None = None,
    jobs: int | None = None,
    cuda_architectures: str | None = None,
) -> BuildResult:
    """Configure and build ``custom_ops/`` with CMake; copy the libraries into ``out_dir``
    (default ``ox_quant/lib``). ``cuda``: True = must build the CUDA library, False = skip it,
    None = build it when nvcc is found."""
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    src = source_dir()
    build_dir = Path(build_dir) if build_dir else src / "build"
    out_dir = Path(out_dir) if out_dir else LIB_DIR
    if shutil.which("cmake") is None:
        raise OxQuantError("cmake not found: install cmake (>= 3.18) and a C++17 compiler")
    include, source = find_ort_headers()
    steps["headers"] = time.perf_counter() - t0
    nvcc = nvcc_path()
    cuda_skipped = None
    if cuda is None:
        cuda = nvcc is not None
        if not cuda:
            cuda_skipped = "nvcc not found"
    elif cuda and nvcc is None:
        raise OxQuantError("--cuda asked for but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    elif not cuda:
        cuda_skipped = "not asked for"
    args = ["cmake", "-S", str(src), "-B", str(build_dir), f"-DORT_INCLUDE_DIR={include}", "-DCMAKE_BUILD_TYPE=Release",
            f"-DOXQ_CUDA={'ON' if cuda else 'OFF'}"]
    if cuda:
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if cuda_architectures:
            args.append(f"-DOXQ_CUDA_ARCHITECTURES={cuda_architectures}")
    t = time.perf_counter()
    _run(args, "cmake configure")
    steps["configure"] = time.perf_counter() - t
    t = time.perf_counter()
    _run(["cmake", "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 2)], "cmake build")
    steps["compile"] = time.perf_counter() - t
    out_dir.mkdir(parents=True, exist_ok=True)
    libraries = []
    for name in [CPU_LIBRARY] + ([CUDA_LIBRARY] if cuda else []):
        built = build_dir / name
        if not built.is_file():
            raise OxQuantError(f"the build finished but {built} is missing")
        target = out_dir / name
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, target)  # atomic: a process that has the old library mapped keeps it
        libraries.append(target)
    return BuildResult(libraries, include, source, time.perf_counter() - t0, cuda_skipped, steps)
