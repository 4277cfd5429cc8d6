"""The Ray scheduler of a study: each row a Ray task, retried when its worker dies, bounded in time.

The only module that imports ``ray`` (the optional extra ``ox-quant[ray]``). Each row runs
``ox_quant.study.run.measure`` in a Ray worker with its resources declared: ``row_cpus`` CPUs,
a memory estimate from the float model's size (``row_memory``), one GPU when the study scores
on CUDA. Model files reach workers through their path (the study's ``--out`` directory, which
every node must see at the same path); only the small ``StudyContext`` goes through the object
store. A worker that dies mid-row is retried up to ``max_retries`` times by Ray, then the row
is ``failed`` with the reason; a row still running ``row_timeout`` seconds after it was
submitted is cancelled (its worker killed) and ``failed``. At most as many rows are in flight as
the cluster has CPUs for, so a row starts when it is submitted. See docs/ray.md.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ox_quant.errors import OxQuantError
from ox_quant.study.jobs import RowJob, StudyContext, failed_row
from ox_quant.study.rows import Row

#: Test hook: the first attempt of the row whose ``RowJob.describe()`` is this kills its own worker
#: (``os._exit``), once: the marker file ``KILL_MARKER`` names is created first and spares later attempts.
KILL_ROW = "OX_QUANT_TEST_KILL_ROW"
KILL_MARKER = "OX_QUANT_TEST_KILL_MARKER"
GiB = 1 << 30


def row_memory(model_bytes: int) -> int:
    """Bytes a row may use: 1 GiB (Python, ONNX Runtime, the task) + 6 x the float model
    (the float model read by the converter or the peer, the quantized copy, the session)."""
    return GiB + 6 * model_bytes


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OxQuantError("--ray needs Ray: pip install 'ox-quant[ray]'") from None
    return ray


def _measure_in_worker(job: RowJob, ctx: StudyContext) -> Row:
    """What a Ray task runs: the row, unless the model file is not visible on this node."""
    if not ctx.src.is_file():
        return failed_row(job, f"{ctx.src} is not visible on host {socket.gethostname()}: the study's --out "
                               "directory must be on a path every Ray node sees (docs/ray.md)")
    if os.environ.get(KILL_ROW) == job.describe():
        marker = os.environ.get(KILL_MARKER, "")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)  # a worker dying mid-row, as a crash or the OOM killer would
    from ox_quant.study.run import measure

    return measure(job, ctx)


def _reason(exc: BaseException) -> str:
    """One line: the exception's type and first line (a task's own exception, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None) or exc
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}".strip().rstrip(":")


@dataclass(frozen=True)
class RayScheduler:
    """Measures rows as Ray tasks (a ``Scheduler`` of ``ox_quant.study.run``).

    ``address``: ``"local"`` (a Ray instance of this process, ``local_cpus`` CPUs), ``"auto"``
    (the cluster ``ray start`` runs on this host) or a cluster address (``host:6379``,
    ``ray://host:10001``). Ray already initialized in this process is used as it is.
    """

    address: str = "local"
    row_cpus: float = 1.0
    max_retries: int = 2
    row_timeout: float | None = 3600.0
    local_cpus: int | None = None
    poll_seconds: float = 1.0

    def __call__(self, jobs: list[RowJob], ctx: StudyContext, on_row: Callable[[RowJob, Row], None],
                 on_stage: Callable[[str], None]) -> None:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            self._init(ray)
        running: dict[Any, tuple[RowJob, float]] = {}
        try:
            if jobs:
                self._run(ray, jobs, ctx, on_row, on_stage, running)
        finally:
            for ref in running:  # interrupted: nothing of ours keeps running on the cluster
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def _init(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if self.address == "local":
                ray.init(address="local", num_cpus=self.local_cpus, object_store_memory=256 << 20, **kwargs)
            else:
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise OxQuantError(f"--ray {self.address}: cannot start or reach Ray ({_reason(exc)})") from None

    def _run(self, ray: Any, jobs: list[RowJob], ctx: StudyContext, on_row: Callable[[RowJob, Row], None],
             on_stage: Callable[[str], None], running: dict[Any, tuple[RowJob, float]]) -> None:
        from ox_quant.study.jobs import model_files_bytes

        resources: dict[str, Any] = {"num_cpus": self.row_cpus, "memory": row_memory(model_files_bytes(ctx.src)),
                                     "max_retries": self.max_retries, "retry_exceptions": False}
        if ctx.options.provider == "cuda":
            resources["num_gpus"] = 1
        env = {k: os.environ[k] for k in (KILL_ROW, KILL_MARKER) if k in os.environ}
        if env:
            resources["runtime_env"] = {"env_vars": env}
        task = ray.remote(_measure_in_worker).options(**resources)
        ctx_ref = ray.put(ctx)
        queue = list(jobs)
        while queue or running:
            capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // self.row_cpus))
            while queue and len(running) < capacity:
                job = queue.pop(0)
                running[task.remote(job, ctx_ref)] = (job, time.monotonic())
            on_stage(f"{len(running)} rows running on Ray, {len(queue)} waiting")
            ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_seconds)
            for ref in ready:
                job, _ = running.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the row's own exception: not retried
                    row = failed_row(job, f"raised {_reason(exc)}")
                except ray.exceptions.RayError as exc:  # the worker or its node died, on every attempt
                    row = failed_row(job, f"Ray task lost after {self.max_retries} retries: {_reason(exc)}")
                on_row(job, row)
            if self.row_timeout is not None:
                now = time.monotonic()
                for ref, (job, submitted) in list(running.items()):
                    if now - submitted > self.row_timeout:
                        ray.cancel(ref, force=True)
                        del running[ref]
                        on_row(job, failed_row(job, f"timed out after {self.row_timeout:g} s (--row-timeout)"))
