"""One conformance suite for both batch backends: local subprocesses and a real SLURM.

Each test submits real jobs (small Python one-liners) and asks the backend what became of
them, as the processing task does: poll everything at once, read states, exit codes, reasons.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from cax.batch import JobSpec, JobState, LocalBackend, Resources, SlurmBackend, recorded_status
from cax.errors import BatchError

WAIT_S = 120.0


@pytest.fixture(params=["local", "slurm"])
def make_backend(request):
    """Return a function ``max_jobs -> backend`` of the kind under test; ends its jobs after."""
    made = []

    def make(max_jobs: int = 4):
        if request.param == "slurm":
            request.getfixturevalue("slurm")
            backend = SlurmBackend(max_jobs)
        else:
            backend = LocalBackend(max_jobs, timeout_s=300)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        if isinstance(backend, SlurmBackend):
            request.getfixturevalue("slurm").cancel_all()
        backend.close()


def python_job(tmp_path: Path, name: str, code: str) -> JobSpec:
    return JobSpec(name=f"cax_{name}_v1", argv=(sys.executable, "-c", code),
                   output=str(tmp_path / f"{name}.log"),
                   resources=Resources(ncpus=1, mem_per_cpu_mb=100, walltime_s=600))


def wait_final(backend, job_id: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        status = backend.poll([job_id])[job_id]
        if not status.active:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status.state} after {timeout}s"
        time.sleep(0.3)


def wait_running(backend, job_id: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while backend.poll([job_id])[job_id].state != JobState.RUNNING:
        assert time.monotonic() < deadline, f"job {job_id} never ran"
        time.sleep(0.2)


def test_completed_job_writes_its_output(make_backend, tmp_path):
    backend = make_backend()
    target = tmp_path / "made.txt"
    spec = python_job(tmp_path, "ok", f"open({str(target)!r}, 'w').write('hello'); print('done')")
    job_id = backend.submit(spec)
    status = wait_final(backend, job_id)
    assert status.state == JobState.COMPLETED, status
    assert status.exit_code in (0, None)
    assert target.read_text() == "hello"
    assert "done" in Path(spec.output).read_text()
    assert recorded_status(job_id, spec.output).state == JobState.COMPLETED


def test_failed_job_has_exit_code_and_output_tail(make_backend, tmp_path):
    backend = make_backend()
    spec = python_job(tmp_path, "bad", "import sys; print('calibration missing', "
                      "file=sys.stderr); sys.exit(3)")
    job_id = backend.submit(spec)
    status = wait_final(backend, job_id)
    assert status.state == JobState.FAILED
    assert status.exit_code == 3
    reason = status.reason(spec.output)
    assert "exit code 3" in reason and "calibration missing" in reason


def test_cancelled_job_is_reported_cancelled(make_backend, tmp_path):
    backend = make_backend()
    spec = python_job(tmp_path, "long", "import time; time.sleep(600)")
    job_id = backend.submit(spec)
    wait_running(backend, job_id)
    backend.cancel(job_id)
    assert wait_final(backend, job_id).state == JobState.CANCELLED


def test_throttle_counts_own_active_jobs(make_backend, tmp_path):
    backend = make_backend(max_jobs=2)
    ids = [backend.submit(python_job(tmp_path, f"t{i}", "import time; time.sleep(600)"))
           for i in range(2)]
    assert backend.free_slots() == 0
    with pytest.raises(BatchError):
        backend.submit(python_job(tmp_path, "t3", "pass"))
    polled = backend.poll()
    assert set(ids) <= set(polled) and all(polled[i].active for i in ids)
    assert backend.active_jobs() == 2
    backend.cancel(ids[0])
    wait_final(backend, ids[0])
    assert backend.free_slots() == 1


def test_one_poll_answers_for_many_jobs_and_unknown_ids(make_backend, tmp_path):
    backend = make_backend(max_jobs=10)
    ids = [backend.submit(python_job(tmp_path, f"m{i}", f"import sys; sys.exit({i})"))
           for i in range(3)]
    for job_id in ids:
        wait_final(backend, job_id)
    unknown = "999999" if isinstance(backend, SlurmBackend) else \
        f"local:{backend.host}:999999:1"
    calls = backend.calls
    polled = backend.poll([*ids, unknown])
    assert backend.calls - calls <= 2  # one squeue, at most one sacct
    assert polled[unknown].state == JobState.LOST
    codes = {polled[i].exit_code for i in ids if polled[i].state != JobState.LOST}
    assert codes <= {0, 1, 2}


def test_malformed_job_id_is_an_error_not_gone(make_backend):
    backend = make_backend()
    with pytest.raises(BatchError):
        backend.poll(["not-a-job"])
