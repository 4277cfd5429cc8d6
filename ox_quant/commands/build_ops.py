"""``ox-quant build-ops``: build the native custom-op libraries into ox_quant/lib."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("build-ops")
@click.option("--cuda/--no-cuda", default=None, help="Build the CUDA library too (default: when nvcc is found).")
@click.option("--cuda-arch", default=None, help='CUDA architectures, CMake style (default "75;80;86;89;90").')
@click.option("--build-dir", type=click.Path(path_type=Path), default=None, help="CMake build directory (default custom_ops/build).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Where the libraries go (default ox_quant/lib).")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs (default: CPU count).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def build_ops_cmd(cuda: bool | None, cuda_arch: str | None, build_dir: Path | None, out_dir: Path | None,
                  jobs: int | None, as_json: bool) -> None:
    """Build ox-quant's ONNX Runtime custom-op libraries (CPU; CUDA when nvcc is there)."""
    from ox_quant.runtime.build import build_ops

    result = build_ops(cuda=cuda, build_dir=build_dir, out_dir=out_dir, jobs=jobs, cuda_architectures=cuda_arch)
    if as_json:
        click.echo(json.dumps({
            "libraries": [str(p) for p in result.libraries],
            "ort_include_dir": str(result.ort_include_dir),
            "header_source": result.header_source,
            "seconds": round(result.seconds, 2),
            "steps": {k: round(v, 2) for k, v in result.steps.items()},
            "cuda_skipped": result.cuda_skipped,
        }))
        return
    for lib in result.libraries:
        click.echo(f"built {lib}")
    click.echo(f"ONNX Runtime headers: {result.ort_include_dir} ({result.header_source})")
    if result.cuda_skipped:
        click.echo(f"CUDA library not built: {result.cuda_skipped}")
    click.echo(f"took {result.seconds:.1f} s")
