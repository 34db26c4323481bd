"""``backlane worker`` as real processes on one SQLite file (DESIGN §2): a worker killed
with SIGKILL loses no job, SIGTERM hands unfinished jobs back, ``--processes`` supervises.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from backlane import JobState
from tests.acceptance import worker_app
from tests.acceptance.conftest import WorkerLab, alive, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_a_worker_killed_with_sigkill_loses_no_job(lab: WorkerLab) -> None:
    ids = lab.enqueue(worker_app.record, [{"pause": 0.02}] * 1000)
    victim = lab.start("--concurrency", "4")
    survivor = lab.start("--concurrency", "4")
    victim_id = victim.started()[victim.pid]
    survivor_id = survivor.started()[survivor.pid]

    def victim_is_busy() -> bool:
        done = lab.jobs(JobState.SUCCEEDED)
        return len(lab.recorded()) >= 200 and sum(j.worker_id == victim_id for j in done) >= 20

    wait_for(victim_is_busy, 30, "200 executions, 20 of them finished by the victim")

    # Which jobs the victim holds when it dies. SIGSTOP freezes it first: from then on it can
    # neither claim, nor finish, nor renew a lease, and a transaction it had open never
    # commits (SIGKILL rolls it back). So the jobs stored `running` under its id now are
    # exactly the jobs it holds at its death. The survivor could only take one of them
    # earlier if its lease had lapsed, i.e. the victim had missed heartbeats for the whole
    # lease (2 s); the snapshot is taken within milliseconds of the stop, and were that ever
    # to happen, the job would be missing from `held` and the checks below would fail (never
    # pass wrongly).
    # The stop can land between two of its batches, when it holds nothing: then let it run a
    # moment and freeze it again.
    held, snapshot_took = victim.freeze_holding(
        lambda: {job.id for job in lab.jobs(JobState.RUNNING) if job.worker_id == victim_id}
    )
    victim.signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    # Every execution the victim ever started is in the log now (each is one atomic write
    # made before the task runs); the survivor cannot start a held job before its lease ends.
    started_by_victim_while_held = held & set(lab.recorded())
    assert held, "the victim held no job at any of 50 freezes: the test proves nothing"
    assert snapshot_took < 0.5

    wait_for(
        lambda: lab.count(JobState.SUCCEEDED) == 1000, 60, "all 1000 jobs succeeded after the kill"
    )
    jobs = {job.id: job for job in lab.jobs()}
    assert set(jobs) == set(ids)
    assert all(job.state is JobState.SUCCEEDED for job in jobs.values())

    executions = lab.executions_by_job()
    ran_twice = {job_id for job_id, n in executions.items() if n > 1}
    assert set(executions) == set(ids), "a job never ran"
    assert max(executions.values()) <= 2
    # At-least-once, and no more than the crash forces: the jobs that ran twice are exactly
    # the held jobs the victim had started; held jobs it had not started yet ran once.
    assert ran_twice <= held
    assert ran_twice == started_by_victim_while_held
    for job_id, job in jobs.items():
        if job_id in held:  # taken again after the lease expired: the attempt counted
            assert (job.worker_id, job.attempts) == (survivor_id, 2)
        else:
            assert job.attempts == 1
    print(
        f"\nkill test: {len(ids)} jobs, {len(lab.recorded())} executions, victim held "
        f"{len(held)} at its death ({len(started_by_victim_while_held)} started), "
        f"{len(ran_twice)} ran twice; victim finished "
        f"{sum(j.worker_id == victim_id for j in jobs.values())}, survivor "
        f"{sum(j.worker_id == survivor_id for j in jobs.values())}"
    )

    survivor.signal(signal.SIGTERM)
    assert survivor.wait(10) == 0


@pytest.mark.timeout(60)
def test_sigterm_finishes_within_grace_and_hands_the_rest_back(
    lab: WorkerLab, tmp_path: Path
) -> None:
    never, soon = tmp_path / "gate-never", tmp_path / "gate-soon"
    long1, long2, short = lab.enqueue(
        worker_app.hold, [{"gate": str(never)}, {"gate": str(never)}, {"gate": str(soon)}]
    )
    first = lab.start("--concurrency", "4", grace=3)
    first_id = first.started()[first.pid]
    wait_for(lambda: len(lab.recorded()) == 3, 20, "the three jobs started")

    first.signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)
    (late,) = lab.enqueue(worker_app.record, [{"pause": 0.0}])  # a stopping worker takes none
    time.sleep(0.2)
    soon.touch()  # this one may finish within the grace period
    assert first.wait(10) == 0
    took = time.monotonic() - signalled
    assert 2.9 <= took < 6, f"exited {took:.1f}s after SIGTERM with a 3s grace period"

    done = lab.job(short)
    assert (done.state, done.worker_id) == (JobState.SUCCEEDED, first_id)
    for job_id in (long1, long2):
        back = lab.job(job_id)
        # attempts 0: handed back uncounted, not left running for its lease to expire
        assert (back.state, back.worker_id, back.attempts) == (JobState.QUEUED, None, 0)
    untouched = lab.job(late)
    assert (untouched.state, untouched.attempts) == (JobState.QUEUED, 0)

    never.touch()
    second = lab.start("--concurrency", "4")
    second_id = second.started()[second.pid]
    wait_for(lambda: lab.count(JobState.SUCCEEDED) == 4, 20, "the handed-back jobs ran")
    for job_id in (long1, long2, late):
        job = lab.job(job_id)
        assert (job.worker_id, job.attempts) == (second_id, 1)
    executions = lab.executions_by_job()
    assert executions == {long1: 2, long2: 2, short: 1, late: 1}
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0


@pytest.mark.timeout(60)
def test_sigterm_with_every_slot_busy_still_exits_within_grace(
    lab: WorkerLab, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    ids = lab.enqueue(worker_app.hold, [{"gate": str(gate)}] * 2)
    worker = lab.start("--concurrency", "2", grace=1)
    worker.started()
    wait_for(lambda: len(lab.recorded()) == 2, 20, "both jobs started")
    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.wait(5) == 0
    assert time.monotonic() - signalled < 3, "the grace period is 1s"
    for job_id in ids:
        job = lab.job(job_id)
        assert (job.state, job.attempts) == (JobState.QUEUED, 0)


@pytest.mark.timeout(60)
def test_a_second_signal_exits_at_once(lab: WorkerLab, tmp_path: Path) -> None:
    (job_id,) = lab.enqueue(worker_app.hold, [{"gate": str(tmp_path / "never")}])
    worker = lab.start("--concurrency", "4", grace=30)
    worker_id = worker.started()[worker.pid]
    wait_for(lambda: len(lab.recorded()) == 1, 20, "the job started")
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.proc.poll() is None, "the first signal waits for the running job"
    worker.signal(signal.SIGINT)
    signalled = time.monotonic()
    assert worker.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - signalled < 2
    assert "exiting at once" in worker.output()
    job = lab.job(job_id)  # not handed back: it returns when its lease expires
    assert (job.state, job.worker_id) == (JobState.RUNNING, worker_id)


@pytest.mark.timeout(60)
def test_queues_limits_what_a_worker_takes(lab: WorkerLab) -> None:
    mail = lab.enqueue(worker_app.record, [{"pause": 0.0}] * 5, queue="mail")
    urgent = lab.enqueue(worker_app.record, [{"pause": 0.0}] * 5, queue="urgent")
    other = lab.enqueue(worker_app.record, [{"pause": 0.0}] * 5)
    worker = lab.start("--queues", "mail, urgent")
    worker.started()
    wait_for(lambda: lab.count(JobState.SUCCEEDED) == 10, 20, "the mail and urgent jobs ran")
    time.sleep(0.5)  # time enough to take the others, were it to
    assert set(lab.recorded()) == set(mail + urgent)
    assert all(lab.job(job_id).state is JobState.QUEUED for job_id in other)
    assert "queues mail,urgent" in worker.output()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0


@pytest.mark.timeout(60)
def test_processes_2_runs_two_workers_and_sigterm_stops_them_all(lab: WorkerLab) -> None:
    ids = lab.enqueue(worker_app.record, [{"pause": 0.05}] * 200)
    parent = lab.start("--processes", "2", "--concurrency", "2")
    children = parent.started(count=2)
    assert len(children) == 2 and parent.pid not in children
    wait_for(lambda: lab.count(JobState.SUCCEEDED) == 200, 40, "all 200 jobs succeeded")

    ran_by = {job.worker_id for job in lab.jobs() if job.id in set(ids)}
    assert ran_by == set(children.values()), "both worker processes ran jobs"

    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0
    assert not any(alive(pid) for pid in children)
    output = parent.output()
    for worker_id in children.values():
        assert f"worker {worker_id} got SIGTERM: stopping gracefully" in output
    assert "exiting at once" not in output


@pytest.mark.timeout(60)
def test_ctrl_c_on_the_process_group_is_one_graceful_stop(lab: WorkerLab) -> None:
    parent = lab.start("--processes", "2")
    children = parent.started(count=2)
    os.killpg(parent.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert parent.wait(15) == 0
    assert not any(alive(pid) for pid in children)
    output = parent.output()
    assert output.count("stopping gracefully") == 2
    assert "exiting at once" not in output


@pytest.mark.timeout(60)
def test_workers_stop_when_their_supervisor_is_killed(lab: WorkerLab) -> None:
    parent = lab.start("--processes", "2")
    children = parent.started(count=2)
    parent.signal(signal.SIGKILL)
    assert parent.wait(10) == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "orphaned workers stopped")
    assert parent.output().count("is gone; stopping") == 2


@pytest.mark.timeout(60)
def test_each_worker_process_runs_the_lanes_lifespan_around_its_jobs(lab: WorkerLab) -> None:
    """The lane's lifespan runs once in each worker process, before its first job and after
    its last: tasks read what it set up through ``TaskContext.state``."""
    notes = lab.tmp_path / "lifespan.log"
    lab.env["WORKER_APP_LIFESPAN_LOG"] = str(notes)
    ids = lab.enqueue(worker_app.lifespan_pid, [{}] * 40)
    parent = lab.start("--processes", "2", "--concurrency", "2")
    children = parent.started(count=2)
    wait_for(lambda: lab.count(JobState.SUCCEEDED) == 40, 40, "all 40 jobs succeeded")
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0

    lines = notes.read_text().splitlines()  # "enter PID", "job ID PID", "exit PID"
    by_pid: dict[int, list[str]] = {}
    for line in lines:
        event, *_, pid = line.split()
        by_pid.setdefault(int(pid), []).append(event if event != "job" else "job")
    assert set(by_pid) == set(children)
    for events in by_pid.values():
        assert events[0] == "enter" and events[-1] == "exit"
        assert events[1:-1] and set(events[1:-1]) == {"job"}
    for job_id in ids:  # each job saw the state its own process's lifespan set up
        job = lab.job(job_id)
        pid = next(pid for pid, worker_id in children.items() if worker_id == job.worker_id)
        assert int(job.result or "0") == pid
        assert f"job {job_id} {pid}" in lines


@pytest.mark.timeout(60)
def test_a_lifespan_that_fails_to_start_stops_the_worker_saying_why(lab: WorkerLab) -> None:
    lab.env["WORKER_APP_LIFESPAN_FAILS"] = "1"
    ids = lab.enqueue(worker_app.record, [{}])
    worker = lab.start()
    assert worker.wait(20) == 1
    assert "the lane's lifespan failed to start" in worker.output()
    assert "the payments API cannot be reached" in worker.output()
    assert lab.job(ids[0]).state is JobState.QUEUED  # never taken
