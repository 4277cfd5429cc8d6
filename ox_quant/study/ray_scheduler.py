"""The Ray scheduler of a study: each row a Ray task, retried when its worker dies, bounded in time.

The only module that imports ``ray`` (the optional extra ``ox-quant[ray]``). Each row runs
``ox_quant.study.run.measure`` in a Ray worker with its resources declared: ``row_cpus`` CPUs,
a memory estimate from the float model's size (``row_memory``), one GPU when the study scores
on CUDA. Model files reach workers through their path (the study's ``--out`` directory, which
every node must see at the same path); only the small ``StudyContext`` goes through the object
store. A worker that dies mid-row is retried up to ``max_retries`` times by Ray, then the row
is ``failed`` with the reason; a row still running ``row_timeout`` seconds after its first
attempt started in a worker is cancelled (its worker killed) and ``failed``. A worker says it
started a row by a file in the shared work directory (``STARTED``), so waiting for a worker
does not count. At most as many rows are in flight as the cluster has CPUs for. See docs/ray.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ox_quant.errors import OxQuantError
from ox_quant.study.jobs import RowJob, StudyContext, failed_row
from ox_quant.study.rows import Row

#: Test hook, ``kill:ROW`` or ``hang:ROW`` (``ROW`` as ``RowJob.describe()`` says it): the first attempt
#: of that row kills its own worker (``os._exit``, as a crash or the OOM killer would), or never ends.
#: The file ``FAULT_MARKER`` names is created first; its presence spares later attempts.
FAULT = "OX_QUANT_TEST_ROW_FAULT"
FAULT_MARKER = "OX_QUANT_TEST_ROW_FAULT_MARKER"
GiB = 1 << 30
#: Folder of the work directory where a worker marks the rows it started (``<n>.started``).
STARTED = ".rows-started"


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


def _measure_in_worker(job: RowJob, ctx: StudyContext, number: int) -> Row:
    """What a Ray task runs: the row, unless the model file is not visible on this node."""
    if not ctx.src.is_file():
        return failed_row(job, f"{ctx.src} is not visible on host {socket.gethostname()}: the study's --out "
                               "directory must be on a path every Ray node sees (docs/ray.md)")
    from ox_quant.study.run import measure
    from ox_quant_models.tasks import TASKS

    TASKS[ctx.options.model].function()  # imports (torch, the task) are the worker's start-up, not the row
    (ctx.work / STARTED / f"{number}.started").touch()
    _test_fault(job)
    return measure(job, ctx)


def _test_fault(job: RowJob) -> None:
    kind, _, row = os.environ.get(FAULT, "").partition(":")
    marker = os.environ.get(FAULT_MARKER, "")
    if row != job.describe() or not marker or os.path.exists(marker):
        return
    open(marker, "w").close()
    if kind == "kill":
        os._exit(17)
    if kind == "hang":
        time.sleep(1e6)


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
        running: dict[Any, tuple[RowJob, int]] = {}
        started = ctx.work / STARTED
        shutil.rmtree(started, ignore_errors=True)  # a killed head's markers
        started.mkdir()
        try:
            if jobs:
                self._run(ray, jobs, ctx, on_row, on_stage, running)
        finally:
            for ref in running:  # interrupted: nothing of ours keeps running on the cluster
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
            shutil.rmtree(started, ignore_errors=True)

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
             on_stage: Callable[[str], None], running: dict[Any, tuple[RowJob, int]]) -> None:
        from ox_quant.study.jobs import model_files_bytes

        resources: dict[str, Any] = {"num_cpus": self.row_cpus, "memory": row_memory(model_files_bytes(ctx.src)),
                                     "max_retries": self.max_retries, "retry_exceptions": False}
        if ctx.options.provider == "cuda":
            resources["num_gpus"] = 1
        env = {k: os.environ[k] for k in (FAULT, FAULT_MARKER) if k in os.environ}
        if env:
            resources["runtime_env"] = {"env_vars": env}
        task = ray.remote(_measure_in_worker).options(**resources)
        ctx_ref = ray.put(ctx)
        queue = list(enumerate(jobs))
        began: dict[int, float] = {}  # row number -> when this process first saw its start marker
        while queue or running:
            capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // self.row_cpus))
            while queue and len(running) < capacity:
                number, job = queue.pop(0)
                running[task.remote(job, ctx_ref, number)] = (job, number)
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
                for ref, (job, number) in list(running.items()):
                    if number not in began and (ctx.work / STARTED / f"{number}.started").exists():
                        began[number] = now
                    if now - began.get(number, now) > self.row_timeout:
                        ray.cancel(ref, force=True)
                        del running[ref]
                        on_row(job, failed_row(job, f"timed out after {self.row_timeout:g} s (--row-timeout)"))
