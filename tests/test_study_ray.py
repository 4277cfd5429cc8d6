"""``ox-quant study --ray`` and ``--resume``: a local Ray instance (2 CPUs) started here and torn down,
a CI-sized CREPE tiny study through it, workers that die or hang, a head process interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ox_quant.core.config import Block, Format, PerTensor, SymmetricRule
from ox_quant.study.jobs import RowJob
from ox_quant.study.ledger import STUDY_JSON
from ox_quant.study.rows import StudyOptions, StudyResult
from ox_quant.study.run import run_study, sequential
from tests.real_models import REPO, ox_quant, require

study_test = [pytest.mark.slow, pytest.mark.models, require("torchcrepe", "torchcrepe")]

try:
    import ray

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install '.[ray]')")

#: 4 rows: ox-quant and the peer at int4 tensor and int4 block:64 (QDQ, so CREPE's Conv weights too).
OPTIONS = StudyOptions(model="crepe-tiny", bits=(4,), granularities=(PerTensor(), Block(64)), format=Format.QDQ)
ARGS = ["crepe-tiny", "--bits", "4", "--granularity", "tensor,block:64", "--format", "qdq"]
TIMING = ("convert_seconds", "eval_seconds")
BLOCK_ROW = "int4 block:64: ox-quant"


def untimed(rows) -> list[dict]:
    return [{k: v for k, v in r.as_dict().items() if k not in TIMING} for r in rows]


def stored(out: Path) -> dict:
    return json.loads((out / STUDY_JSON).read_text())


def leftovers(out: Path) -> list[str]:
    """Temp files of the atomic writes (none may survive)."""
    return [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def mark(*marks):
    def apply(f):
        for m in reversed(marks):
            f = m(f)
        return f

    return apply


@pytest.fixture(scope="module")
def sequential_study(tmp_path_factory) -> tuple[Path, StudyResult]:
    out = tmp_path_factory.mktemp("seq")
    return out, run_study(OPTIONS, out)


# ------------------------------------------------------------------ a local Ray instance, started and torn down


def _processes() -> dict[int, str]:
    """pid -> command line of every process (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def _parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _instance_processes(session_dir: str) -> set[int]:
    """The Ray instance's processes: those naming its session directory, and their descendants (workers)."""
    procs = _processes()
    ours = {pid for pid, cmd in procs.items() if session_dir in cmd}
    grew = True
    while grew:
        more = {pid for pid in procs if pid not in ours and _parent(pid) in ours}
        grew = bool(more)
        ours |= more
    return ours


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install '.[ray]')")
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        started = _instance_processes(session_dir)
        ray.shutdown()
        deadline = time.monotonic() + 30
        while (alive := started & set(_processes())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert started, "found no process of the Ray instance"
        assert not alive, f"Ray processes left behind: {[_processes().get(p) for p in alive]}"
        assert not _instance_processes(session_dir)


def ray_scheduler(**kwargs):
    from ox_quant.study.ray_scheduler import RayScheduler

    return RayScheduler(poll_seconds=0.2, **kwargs)


# ------------------------------------------------------------------ same rows as the sequential study


@mark(*study_test, needs_ray)
def test_ray_study_gives_the_sequential_rows(cluster, sequential_study, tmp_path):
    seq_out, seq = sequential_study
    result = run_study(OPTIONS, tmp_path, scheduler=ray_scheduler())
    assert untimed(result.rows) == untimed(seq.rows) and untimed(result.peer_rows) == untimed(seq.peer_rows)
    assert untimed([result.fp32]) == untimed([seq.fp32])
    assert [r.status for r in result.rows] == ["ok", "ok"]
    assert result.details["model_hash"] == seq.details["model_hash"]
    data = stored(tmp_path)  # streamed: every row is in study.json before the report is written
    assert data["details"]["rows_pending"] == 0 and len(data["rows"]) == len(data["peer_rows"]) == 2
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ faults: a worker killed, a row that hangs


@mark(*study_test, needs_ray)
def test_a_worker_killed_mid_row_is_retried(cluster, sequential_study, tmp_path, monkeypatch):
    _, seq = sequential_study
    options = StudyOptions(**{**OPTIONS.__dict__, "granularities": (Block(64),), "peer": False})
    marker = tmp_path / "killed"
    monkeypatch.setenv("OX_QUANT_TEST_ROW_FAULT", f"kill:{BLOCK_ROW}")
    monkeypatch.setenv("OX_QUANT_TEST_ROW_FAULT_MARKER", str(marker))
    result = run_study(options, tmp_path / "retried", scheduler=ray_scheduler(max_retries=1))
    assert marker.exists()  # the first attempt ran and its worker died
    assert untimed(result.rows) == untimed(seq.rows[1:])  # the retry measured the row

    marker.unlink()  # the same crash with no retry left: the row fails, saying why; the study completes
    result = run_study(options, tmp_path / "failed", scheduler=ray_scheduler(max_retries=0))
    (row,) = result.rows
    assert row.status == "failed" and "lost after 0 retries" in row.reason and "WorkerCrashedError" in row.reason


@mark(*study_test, needs_ray)
def test_a_hung_row_times_out(cluster, sequential_study, tmp_path, monkeypatch):
    _, seq = sequential_study
    monkeypatch.setenv("OX_QUANT_TEST_ROW_FAULT", f"hang:{BLOCK_ROW}")
    monkeypatch.setenv("OX_QUANT_TEST_ROW_FAULT_MARKER", str(tmp_path / "hung"))
    options = StudyOptions(**{**OPTIONS.__dict__, "peer": False})
    result = run_study(options, tmp_path / "s", scheduler=ray_scheduler(row_timeout=15.0))
    ok, hung = result.rows
    assert untimed([ok]) == untimed(seq.rows[:1])
    assert hung.status == "failed" and hung.reason == "timed out after 15 s (--row-timeout)"


# ------------------------------------------------------------------ resume


def recording(calls: list[RowJob]):
    def scheduler(jobs, ctx, on_row, on_stage):
        calls.extend(jobs)
        sequential(jobs, ctx, on_row, on_stage)

    return scheduler


@mark(*study_test)
def test_resume_measures_only_the_missing_rows(sequential_study, tmp_path):
    seq_out, seq = sequential_study
    out = tmp_path / "s"
    out.mkdir()
    data = stored(seq_out)  # an interrupted study: the second configuration's rows never came
    data["rows"], data["peer_rows"] = data["rows"][:1], data["peer_rows"][:1]
    data["details"]["rows_pending"] = 2
    (out / STUDY_JSON).write_text(json.dumps(data))
    calls: list[RowJob] = []
    result = run_study(OPTIONS, out, scheduler=recording(calls), resume=True)
    assert [j.describe() for j in calls] == [BLOCK_ROW, "int4 block:64: onnxruntime"]
    assert result.rows[0] == seq.rows[0] and result.peer_rows[0] == seq.peer_rows[0]  # kept, timings too
    assert result.fp32 == seq.fp32 and result.details["rows_reused"] == 3  # fp32 and the two stored rows
    assert untimed(result.rows) == untimed(seq.rows) and untimed(result.peer_rows) == untimed(seq.peer_rows)

    calls.clear()  # another configuration of the same rows: nothing kept
    other = StudyOptions(**{**OPTIONS.__dict__, "symmetric_rule": SymmetricRule.ABSMAX})
    run_study(other, out, scheduler=recording(calls), resume=True)
    assert len(calls) == 4
    calls.clear()
    run_study(other, out, scheduler=recording(calls), resume=True)  # all there now
    assert calls == []
    data = stored(out)  # another model hash (another export, other weights): nothing kept
    data["details"]["model_hash"] = "sha256:0"
    (out / STUDY_JSON).write_text(json.dumps(data))
    run_study(other, out, scheduler=recording(calls), resume=True)
    assert len(calls) == 4
    assert leftovers(out) == []


@mark(*study_test, needs_ray)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_an_interrupted_head_loses_no_row(cluster, sequential_study, tmp_path, sig):
    """The head process of a Ray study, interrupted while one row hangs: the finished rows are in
    study.json (whole, no temp file left); --resume measures only the missing row."""
    _, seq = sequential_study
    out = tmp_path / "s"
    env = {**os.environ, "OX_QUANT_TEST_ROW_FAULT": f"hang:{BLOCK_ROW}",
           "OX_QUANT_TEST_ROW_FAULT_MARKER": str(tmp_path / "hung")}
    head = subprocess.Popen([sys.executable, "-m", "ox_quant.cli", "study", *ARGS, "--out", str(out), "--ray", cluster],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and head.poll() is None:
            path = out / STUDY_JSON
            if path.is_file() and json.loads(path.read_text())["details"]["rows_pending"] == 1:
                break  # three rows in, the fourth hangs
            time.sleep(0.2)
        assert head.poll() is None, f"the study ended before it was interrupted: {head.stderr.read() if head.stderr else ''}"
        head.send_signal(sig)
        code = head.wait(timeout=60)
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert head.stderr is not None and head.stderr.read().strip().endswith("ox-quant: interrupted")
    data = stored(out)
    assert len(data["rows"]) + len(data["peer_rows"]) == 3 and leftovers(out) == []
    calls: list[RowJob] = []
    result = run_study(OPTIONS, out, scheduler=recording(calls), resume=True)
    assert [j.describe() for j in calls] == [BLOCK_ROW]
    assert untimed(result.rows) == untimed(seq.rows) and untimed(result.peer_rows) == untimed(seq.peer_rows)
    shutil.rmtree(out)


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize("args, message", [
    (["--row-cpus", "2"], "--row-cpus only apply with --ray"),
    (["--max-retries", "1", "--row-timeout", "5"], "--max-retries, --row-timeout only apply with --ray"),
    (["--ray", "auto", "--ray-cpus", "2"], "--ray-cpus only applies with --ray local, not --ray auto"),
])
def test_ray_flags_need_ray(args, message, tmp_path):
    proc = ox_quant("study", "crepe-tiny", *args, "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"ox-quant: error: {message}"]
    assert not (tmp_path / "s").exists()


def test_ray_missing_is_one_line(tmp_path):
    """Without Ray (here: a ``ray`` package that fails to import, first on the path), --ray says what to install."""
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ox_quant.cli", "study", "crepe-tiny", "--ray", "--out",
                           str(tmp_path / "s")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["ox-quant: error: --ray needs Ray: pip install 'ox-quant[ray]'"]
    assert not (tmp_path / "s").exists()
